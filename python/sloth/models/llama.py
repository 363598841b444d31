"""Llama (Llama 2 / 3 / 3.1 / 3.2 text models)."""

from .spec import FamilySpec, NormSpec

SPEC = FamilySpec(
    model_type="llama", name="Llama", causal_lm="LlamaForCausalLM", decoder_layer="LlamaDecoderLayer",
    attention="LlamaAttention", mlp="LlamaMLP", norm=NormSpec("LlamaRMSNorm"), gguf_arch="llama",
)
