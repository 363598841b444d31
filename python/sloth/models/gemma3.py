"""Gemma 3 (text): (1 + w) norms rounded once, q / k norms, sandwich norms around the MLP (whose output the
post-MLP norm reads), interleaved sliding-window layers, final logit softcapping."""

from .spec import AttentionFeatures, FamilySpec, NormSpec

SPEC = FamilySpec(
    model_type="gemma3_text", name="Gemma 3 (text)", causal_lm="Gemma3ForCausalLM",
    decoder_layer="Gemma3DecoderLayer", attention="Gemma3Attention", mlp="Gemma3MLP",
    norm=NormSpec("Gemma3RMSNorm", offset=1.0, cast_before_weight=False, eps_attr="eps"),
    mlp_output_feeds_residual=False,
    attention_features=AttentionFeatures(sliding_window=True, softcap=True, qk_norm=True), gguf_arch="gemma3",
    near_misses=("gemma3",),
    note="multimodal Gemma 3 checkpoints (model_type 'gemma3') are not supported yet; text-only ones such as "
         "gemma-3-1b are",
)
