"""gpt-oss: learned attention sinks on every layer, a 128-token sliding window on every other one, a
half-split RoPE, MoE experts with gpt-oss's clamped GLU and biases (MXFP4 in the released checkpoints), RMSNorm
rounded once at the end."""

from .spec import AttentionFeatures, FamilySpec, NormSpec

SPEC = FamilySpec(
    model_type="gpt_oss", name="gpt-oss", causal_lm="GptOssForCausalLM", decoder_layer="GptOssDecoderLayer",
    attention="GptOssAttention", experts="GptOssExperts",
    norm=NormSpec("GptOssRMSNorm", cast_before_weight=False),
    rope="half_split", attention_features=AttentionFeatures(sliding_window=True, sinks=True),
    attention_kernel="sloth",
)
