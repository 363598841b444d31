"""Qwen3-MoE: Qwen3's attention (q / k norms) with SwiGLU experts (softmax top-k routing, optional
renormalisation) and dense MLPs on the layers ``mlp_only_layers`` names."""

from .spec import AttentionFeatures, FamilySpec, NormSpec

SPEC = FamilySpec(
    model_type="qwen3_moe", name="Qwen3-MoE", causal_lm="Qwen3MoeForCausalLM", decoder_layer="Qwen3MoeDecoderLayer",
    attention="Qwen3MoeAttention", mlp="Qwen3MoeMLP", experts="Qwen3MoeExperts", norm=NormSpec("Qwen3MoeRMSNorm"),
    attention_features=AttentionFeatures(sliding_window=True, qk_norm=True),
)
