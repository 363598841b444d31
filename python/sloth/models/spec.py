"""What sloth knows about one Transformers model family: :class:`FamilySpec`, declared once per family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class NormSpec:
    """An RMSNorm flavour: ``y = x * rstd * (offset + w)``, rounded to x's dtype either once at the end
    (``cast_before_weight=False``, Gemma) or after ``x * rstd`` before the weight multiply (Llama)."""

    cls: str                   # Transformers class name, e.g. "LlamaRMSNorm"
    offset: float = 0.0        # 1.0 for Gemma's (1 + w)
    cast_before_weight: bool = True
    eps_attr: str = "variance_epsilon"  # the module attribute holding epsilon


@dataclass(frozen=True)
class AttentionFeatures:
    """What a family's attention needs beyond plain causal softmax attention."""

    sliding_window: bool = False  # some or all layers attend to a left window (config.sliding_window)
    sinks: bool = False           # a learned per-head sink logit in the softmax denominator (gpt-oss)
    softcap: bool = False         # tanh capping of attention scores (config.attn_logit_softcapping)
    qk_norm: bool = False         # RMSNorm of q and k before RoPE (Qwen3, Gemma 3)


@dataclass(frozen=True)
class FamilySpec:
    """One model family: the Transformers classes sloth swaps and the facts its kernels depend on.

    Every table that depends on the family (``sloth.patch``, ``sloth.from_pretrained``, ``sloth finetune``,
    export) reads these specs through :mod:`sloth.models`; adding a family is one module in this package plus its
    tests."""

    model_type: str                     # config.model_type, e.g. "llama"
    name: str                           # shown to users, e.g. "Llama"
    causal_lm: str                      # e.g. "LlamaForCausalLM"
    decoder_layer: str                  # e.g. "LlamaDecoderLayer"
    attention: str                      # e.g. "LlamaAttention"
    norm: NormSpec
    mlp: Optional[str] = None           # dense GLU MLP class, e.g. "LlamaMLP"
    experts: Optional[str] = None       # fused experts class of MoE families, e.g. "Qwen3MoeExperts"
    #: the decoder layer ends ``residual + mlp(...)`` and nothing else reads the MLP output, so the recompute of a
    #: checkpointed layer may skip the down projection's product (False for Gemma 3: its post-MLP norm reads it)
    mlp_output_feeds_residual: bool = True
    #: q / k rotation: "rotate_half" (HF's rotate_half with cos / sin [.., head_dim], on sloth's RoPE kernel) or
    #: "half_split" (gpt-oss: cos / sin [.., head_dim / 2] on the two halves; the model's own code runs it)
    rope: str = "rotate_half"
    #: the attention function :func:`sloth.patch` selects: "model" (the model's own choice, e.g. SDPA) or "sloth"
    #: (:func:`sloth.attention`, Transformers' attention "sloth"; families whose attention SDPA cannot express)
    attention_kernel: str = "model"
    attention_features: AttentionFeatures = AttentionFeatures()
    gguf_arch: Optional[str] = None     # llama.cpp architecture the GGUF exporter writes (None: no GGUF export)
    aliases: Tuple[str, ...] = ()       # other model_types served by this spec
    near_misses: Tuple[str, ...] = ()   # unsupported model_types that ``note`` answers (e.g. multimodal Gemma 3)
    note: str = ""                      # one line for users who load a near miss

    @property
    def model_types(self) -> Tuple[str, ...]:
        return (self.model_type,) + self.aliases
