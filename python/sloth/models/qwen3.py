"""Qwen3 (dense): Llama's layout with RMSNorm on q and k per head."""

from .spec import AttentionFeatures, FamilySpec, NormSpec

SPEC = FamilySpec(
    model_type="qwen3", name="Qwen3", causal_lm="Qwen3ForCausalLM", decoder_layer="Qwen3DecoderLayer",
    attention="Qwen3Attention", mlp="Qwen3MLP", norm=NormSpec("Qwen3RMSNorm"),
    attention_features=AttentionFeatures(sliding_window=True, qk_norm=True), gguf_arch="qwen3",
)
