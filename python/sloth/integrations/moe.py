"""sloth's MoE experts as Transformers' experts implementation ``"sloth"``.

:func:`register` adds ``"sloth"`` to Transformers' ``ExpertsInterface``; a model then selects it with
``model.set_experts_implementation("sloth")`` or ``from_pretrained(..., experts_implementation="sloth")``.
The function handles Transformers' experts modules decorated with ``use_experts_implementation`` whose gate is
SwiGLU (Qwen3-MoE and its relatives: ``act_fn`` SiLU, concatenated or interleaved [gate; up]) or gpt-oss's
clamped GLU (``alpha`` / ``limit`` attributes, interleaved, with biases); :func:`is_supported` says whether a
module qualifies, and anything else falls back to the module's own forward.

Beyond the stock 16-bit ``gate_up_proj`` / ``down_proj`` parameters, an experts module may carry:
  * 4-bit stacks (:func:`quantize_experts_` or :func:`set_expert_weight_`): buffers ``sloth_<proj>_*`` that
    replace the parameter; the GEMMs decode them in their mainloop (no dequantized stack).
  * per-expert LoRA (:func:`add_lora_`): parameters ``sloth_lora_<proj>_A [E, r, in]`` / ``_B [E, out, r]``
    and ``sloth_lora_scaling``.
"""

from __future__ import annotations

import torch

from ..nn.moe import MoEExpertsSpec, moe_experts
from ..ops.moe import GLU_KINDS, MoEWeight

NAME = "sloth"
_PROJ = ("gate_up", "down")
_FIELDS = ("data", "scale", "code2", "absmax2", "offset")


def _glu_of(module) -> int | None:
    """The GLU code of a decorated experts module, or None when it is not one sloth computes."""
    if not getattr(module, "has_gate", True):
        return None
    concat = getattr(module, "is_concatenated", True)
    if hasattr(module, "alpha") and hasattr(module, "limit") and "GptOss" in type(module).__name__:
        return GLU_KINDS["gptoss_concat" if concat else "gptoss"]
    act = getattr(module, "act_fn", None)
    if isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU"):
        if type(module)._apply_gate.__name__ != "_default_apply_gate":
            return None  # a custom gate this module defines
        return GLU_KINDS["swiglu" if concat else "swiglu_interleaved"]
    return None


def is_supported(module) -> tuple[bool, str]:
    """(ok, reason): whether the experts implementation ``"sloth"`` computes this experts module."""
    if not hasattr(module, "has_gate"):
        return False, "not an experts module decorated with transformers' use_experts_implementation"
    if getattr(module, "has_post_expert_norm", False):
        return False, "post-expert norms are not supported"
    if getattr(module, "_is_expert_parallel", False):
        return False, "expert parallelism is not supported"
    if _glu_of(module) is None:
        return False, f"the gate of {type(module).__name__} is neither SwiGLU nor gpt-oss's clamped GLU"
    for p in _PROJ:
        if _weight_of(module, p) is None:
            return False, f"no {p}_proj weight"
    return True, ""


def _weight_of(module, proj: str):
    """(MoEWeight, trans) of a projection: a 4-bit stack registered by sloth, else the module's 3-D parameter."""
    meta = getattr(module, "_sloth_moe_meta", {}).get(proj)
    if meta is not None:
        fmt, shape, blocksize, blocksize2 = meta
        t = {f: getattr(module, f"sloth_{proj}_{f}", None) for f in _FIELDS}
        return MoEWeight(fmt, t["data"], shape, t["scale"], t["code2"], t["absmax2"], t["offset"], blocksize,
                         blocksize2), False
    w = getattr(module, f"{proj}_proj", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        return None
    return MoEWeight.dense(w), bool(getattr(module, "is_transposed", False))


def experts_spec(module) -> MoEExpertsSpec:
    """The :class:`MoEExpertsSpec` of a supported experts module (its weights, biases, GLU and LoRA)."""
    (gu, gu_t), (dn, dn_t) = _weight_of(module, "gate_up"), _weight_of(module, "down")
    has_bias = getattr(module, "has_bias", False)
    lora = {}
    for p in _PROJ:
        A = getattr(module, f"sloth_lora_{p}_A", None)
        if A is not None:
            lora[p] = (A, getattr(module, f"sloth_lora_{p}_B"))
    return MoEExpertsSpec(
        gate_up=gu, down=dn, gate_up_trans=gu_t, down_trans=dn_t,
        gate_up_bias=getattr(module, "gate_up_proj_bias", None) if has_bias else None,
        down_bias=getattr(module, "down_proj_bias", None) if has_bias else None,
        glu=_glu_of(module), alpha=float(getattr(module, "alpha", 1.702)), limit=float(getattr(module, "limit", 7.0)),
        lora=lora, scaling=float(getattr(module, "sloth_lora_scaling", 1.0)))


def sloth_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """Transformers' experts-implementation signature: ``[T, H]`` hidden states, ``[T, k]`` ids and weights."""
    ok, _ = is_supported(self)
    if not ok:
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    out = moe_experts(hidden_states, top_k_index, top_k_weights, experts_spec(self))
    return out.to(hidden_states.dtype)


def register() -> bool:
    """Register ``"sloth"`` in Transformers' ExpertsInterface (idempotent); False without Transformers 5."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(NAME, sloth_experts_forward)
    return True


def set_expert_weight_(module, proj: str, weight: MoEWeight) -> None:
    """Replace ``<proj>_proj`` of an experts module by a 4-bit stack stored [E, out, in] (``weight.shape``)."""
    if proj not in _PROJ:
        raise ValueError(f"sloth: proj must be one of {_PROJ}, got {proj!r}")
    if weight.fmt == "dense":
        raise ValueError("sloth: set_expert_weight_ takes NF4 / MXFP4 stacks; dense weights stay parameters")
    if hasattr(module, f"{proj}_proj"):
        delattr(module, f"{proj}_proj")
    for f in _FIELDS:
        t = getattr(weight, f)
        name = f"sloth_{proj}_{f}"
        if name in module._buffers:
            del module._buffers[name]
        if t is not None:
            module.register_buffer(name, t)
    meta = dict(getattr(module, "_sloth_moe_meta", {}))
    meta[proj] = (weight.fmt, tuple(weight.shape), weight.blocksize, weight.blocksize2)
    module._sloth_moe_meta = meta


def quantize_experts_(module, fmt: str = "nf4", blocksize: int = 64) -> None:
    """Quantize both 16-bit stacks of an experts module in place to ``fmt`` ("nf4" / "mxfp4"), stored
    [E, out, in] (gpt-oss's [E, in, out] parameters are transposed first), frozen."""
    for proj in _PROJ:
        w, trans = _weight_of(module, proj)
        if w.fmt != "dense":
            continue
        t = w.data.detach()
        t = t.transpose(1, 2) if trans else t  # [E, out, in]
        q = MoEWeight.quantize_nf4(t.contiguous(), blocksize) if fmt == "nf4" else MoEWeight.quantize_mxfp4(t)
        set_expert_weight_(module, proj, q)


def add_lora_(module, r: int = 16, lora_alpha: float = 16.0, dtype=None) -> None:
    """Per-expert LoRA on both projections: ``sloth_lora_<proj>_A [E, r, in]`` (Kaiming-uniform, as PEFT) and
    ``_B [E, out, r]`` (zeros), scaled by lora_alpha / r."""
    for proj in _PROJ:
        w, trans = _weight_of(module, proj)
        E, a, b = w.shape
        out_f, in_f = (b, a) if trans else (a, b)
        dev = w.data.device
        dt = dtype or (w.data.dtype if w.fmt == "dense" else torch.bfloat16)
        A = torch.empty(E, r, in_f, device=dev, dtype=dt)
        for e in range(E):
            torch.nn.init.kaiming_uniform_(A[e], a=5 ** 0.5)
        module.register_parameter(f"sloth_lora_{proj}_A", torch.nn.Parameter(A))
        module.register_parameter(f"sloth_lora_{proj}_B", torch.nn.Parameter(torch.zeros(E, out_f, r, device=dev,
                                                                                          dtype=dt)))
    module.sloth_lora_scaling = lora_alpha / r
