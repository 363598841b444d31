"""Mistral: Llama's layout with an optional sliding window on every layer."""

from .spec import AttentionFeatures, FamilySpec, NormSpec

SPEC = FamilySpec(
    model_type="mistral", name="Mistral", causal_lm="MistralForCausalLM", decoder_layer="MistralDecoderLayer",
    attention="MistralAttention", mlp="MistralMLP", norm=NormSpec("MistralRMSNorm"),
    attention_features=AttentionFeatures(sliding_window=True), gguf_arch="llama",
)
