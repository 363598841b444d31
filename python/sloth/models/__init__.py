"""The model registry: one declarative :class:`FamilySpec` per supported family, one module each.

Everything family-specific in sloth reads this registry: :func:`sloth.patch` (norms, MLPs, attention, the
causal-LM loss, attention and experts implementations), :func:`sloth.from_pretrained` (which checkpoints load),
:func:`sloth.get_peft_model` (expert targets), ``sloth finetune`` and the GGUF exporter. A new
family is one module here that defines ``SPEC``, listed in ``_FAMILY_MODULES``, plus its tests.
"""

from __future__ import annotations

import importlib
from typing import Dict, Iterable, Optional

from .spec import AttentionFeatures, FamilySpec, NormSpec

_FAMILY_MODULES = ("llama", "qwen3", "mistral", "gemma3", "gpt_oss", "qwen3_moe")

FAMILIES: Dict[str, FamilySpec] = {}  # model_type (aliases included) -> spec


def register(spec: FamilySpec) -> FamilySpec:
    """Add ``spec`` to the registry (a model_type already taken is an error); returns it."""
    for mt in spec.model_types:
        if mt in FAMILIES and FAMILIES[mt] is not spec:
            raise ValueError(f"sloth.models: model_type {mt!r} is already registered by {FAMILIES[mt].name}")
        FAMILIES[mt] = spec
    return spec


for _name in _FAMILY_MODULES:
    register(importlib.import_module(f"{__name__}.{_name}").SPEC)


def specs() -> Iterable[FamilySpec]:
    """Every registered family once, in registration order."""
    return list(dict.fromkeys(FAMILIES.values()))


def for_model_type(model_type: Optional[str]) -> Optional[FamilySpec]:
    """The spec of ``model_type`` (a Transformers config's ``model_type``), or None when unsupported."""
    return FAMILIES.get(model_type) if model_type else None


def for_config(config) -> Optional[FamilySpec]:
    """The spec of a Transformers config (its ``model_type``), or None when unsupported."""
    return for_model_type(getattr(config, "model_type", None))


def supported() -> str:
    """``Llama (llama), Qwen3 (qwen3), ...``: the supported families and their ``model_type``, for messages."""
    return ", ".join(f"{s.name} ({s.model_type})" for s in specs())


def unsupported_hint(model_type: Optional[str]) -> str:
    """A family's note about a near-miss ``model_type`` (e.g. multimodal Gemma 3), or ""."""
    return next((s.note for s in specs() if model_type in s.near_misses), "")


def norms() -> Dict[str, NormSpec]:
    """RMSNorm class name -> its flavour, over every family."""
    return {s.norm.cls: s.norm for s in specs()}


def _classes(attr: str) -> Dict[str, FamilySpec]:
    return {getattr(s, attr): s for s in specs() if getattr(s, attr)}


def causal_lms() -> Dict[str, FamilySpec]:
    """ForCausalLM class name -> spec."""
    return _classes("causal_lm")


def mlps() -> Dict[str, FamilySpec]:
    """Dense MLP class name -> spec."""
    return _classes("mlp")


def attentions() -> Dict[str, FamilySpec]:
    """Attention class name -> spec."""
    return _classes("attention")


def rope_attentions() -> Dict[str, FamilySpec]:
    """Attention class name -> spec, for the families whose RoPE sloth's kernel computes (``rope="rotate_half"``)."""
    return {k: s for k, s in attentions().items() if s.rope == "rotate_half"}


def decoder_layers() -> Dict[str, FamilySpec]:
    """Decoder layer class name -> spec."""
    return _classes("decoder_layer")


def experts() -> Dict[str, FamilySpec]:
    """Fused experts class name -> spec (MoE families)."""
    return _classes("experts")


def family_of(model) -> Optional[FamilySpec]:
    """The spec of a Transformers model (or a PeftModel around one), from its config; None when unsupported."""
    cfg = getattr(model, "config", None)
    spec = for_config(cfg)
    if spec is None and hasattr(model, "get_base_model"):
        spec = for_config(getattr(model.get_base_model(), "config", None))
    return spec


__all__ = ["AttentionFeatures", "FAMILIES", "FamilySpec", "NormSpec", "attentions", "rope_attentions", "causal_lms",
           "decoder_layers", "experts", "family_of", "for_config", "for_model_type", "mlps", "norms", "register",
           "specs", "supported", "unsupported_hint"]
