"""RMSNorm (``torch.ops.sloth.rms_norm_forward`` / ``rms_norm_backward``) and RoPE, in place (``rope_``) or into
new tensors (``rope``)."""

from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, check_device_supported, check_tensor


def _check_norm(x, weight):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor("weight", weight, dtypes=(x.dtype,), dim=1, device=x.device)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"sloth: weight has {weight.shape[0]} entries but x {tuple(x.shape)} has {x.shape[1]} columns")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                     cast_before_weight: bool = True):
    """RMSNorm of the rows of ``x [rows, H]``: ``y = x * rstd * (offset + weight)``, fp32 math, and
    ``rstd = 1 / sqrt(mean(x^2) + eps)`` ([rows] fp32, saved for backward). ``offset`` is 0 for Llama / Qwen /
    Mistral and 1 for Gemma. ``cast_before_weight`` rounds ``x * rstd`` to x's dtype before the weight multiply
    (LlamaRMSNorm); False rounds once at the end (Gemma3RMSNorm).

    One CTA per row on the GPU with 16-byte loads, the row held in registers: reads x once and w (L2-resident),
    writes y and rstd, about ``2 * rows * H * sizeof(dtype)`` bytes of DRAM traffic."""
    _check_norm(x, weight)
    check_device_supported(x, "rms_norm_forward")
    return torch.ops.sloth.rms_norm_forward(x, weight, float(eps), float(offset), bool(cast_before_weight))


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      offset: float = 0.0, cast_before_weight: bool = True, compute_dw: bool = True):
    """(dx [rows, H] in x's dtype, dw [H] fp32 summed over rows; empty when not ``compute_dw``).

    GPU traffic: reads dy and x once (2 rows H elements), writes dx, plus one fp32 [CTAs, H] partial of dw
    written and reduced once (CTAs = 2 x SMs)."""
    _check_norm(x, weight)
    check_tensor("dy", dy, dtypes=(x.dtype,), device=x.device)
    check_tensor("rstd", rstd, dtypes=(torch.float32,), dim=1, device=x.device)
    if dy.shape != x.shape:
        raise ValueError(f"sloth: dy {tuple(dy.shape)} must have x's shape {tuple(x.shape)}")
    check_device_supported(x, "rms_norm_backward")
    return torch.ops.sloth.rms_norm_backward(dy, x, weight, rstd, float(offset), bool(cast_before_weight),
                                             bool(compute_dw))


def _check_rope(q, k, cos, sin, op):
    check_tensor("q", q, dtypes=FLOAT_DTYPES, dim=3)
    check_tensor("k", k, dtypes=(q.dtype,), dim=3, device=q.device)
    check_tensor("cos", cos, dtypes=FLOAT_DTYPES, dim=2, device=q.device)
    check_tensor("sin", sin, dtypes=FLOAT_DTYPES, dim=2, device=q.device)
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"sloth: q {tuple(q.shape)} and k {tuple(k.shape)} must share tokens and head_dim")
    if cos.shape != sin.shape or cos.shape[0] != q.shape[0]:
        raise ValueError(f"sloth: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [tokens, rot_dim]")
    if cos.shape[1] % 2 or cos.shape[1] > q.shape[2]:
        raise ValueError(f"sloth: rot_dim {cos.shape[1]} must be even and at most head_dim {q.shape[2]}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"sloth: {op} needs the last dim of q and k contiguous")
    check_device_supported(q, op)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> None:
    """Rotate, in place, the first ``rot_dim`` dims of ``q [tokens, heads, D]`` and ``k [tokens, kv_heads, D]``
    (HF "rotate_half": x1 = first half, x2 = second half of the rotary dims) by ``cos / sin [tokens, rot_dim]``
    (as the model's rotary embedding computes them, any scaling). ``inverse`` applies the transposed rotation
    (the backward; equal to the forward with -sin). The last dim must be contiguous; q and k must not share
    memory; fp32 math. Traffic: reads and writes the rotary part of q and k once; cos / sin once per token (fp32)."""
    _check_rope(q, k, cos, sin, "rope_")
    torch.ops.sloth.rope_(q, k, cos, sin, bool(inverse))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False):
    """:func:`rope_` into new tensors: returns (q', k'), contiguous ``[tokens, heads, D]`` / ``[tokens, kv_heads,
    D]``, with the dims past ``rot_dim`` copied; q and k are only read (they may alias). The functional form that
    torch.compile traces without a mutation. Traffic: reads q and k once, writes q' and k' once."""
    _check_rope(q, k, cos, sin, "rope")
    return torch.ops.sloth.rope(q, k, cos, sin, bool(inverse))


@torch.library.register_fake("sloth::rms_norm_forward")
def _(x, weight, eps, offset, cast_before_weight):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.register_fake("sloth::rms_norm_backward")
def _(dy, x, weight, rstd, offset, cast_before_weight, compute_dw):
    return torch.empty_like(x), x.new_empty((x.shape[1] if compute_dw else 0,), dtype=torch.float32)


@torch.library.register_fake("sloth::rope_")
def _(q, k, cos, sin, inverse):
    return None


@torch.library.register_fake("sloth::rope")
def _(q, k, cos, sin, inverse):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
