"""Differentiable RMSNorm and RoPE on torch.ops.sloth (one kernel each way)."""

from __future__ import annotations

import math

import torch

from ..ops.norm_rope import rms_norm_backward, rms_norm_forward, rope_
from ..ops.norm_rope import rope as rope_out


class RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * (offset + w) over the last dim; saves x and rstd; dw is accumulated in fp32."""

    @staticmethod
    def forward(ctx, x2, weight, eps: float, offset: float, cast_before_weight: bool):
        # x2 [rows, H] -> y [rows, H]; the caller reshapes (a view made outside the Function, so that later
        # in-place work on it, e.g. RoPE of a normed q, is allowed by autograd)
        x2 = x2.contiguous()
        y, rstd = rms_norm_forward(x2, weight, eps, offset, cast_before_weight)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.cast_before_weight = offset, cast_before_weight
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy.contiguous(), x2, weight, rstd, ctx.offset, ctx.cast_before_weight,
                                   ctx.needs_input_grad[1])
        return dx, (dw.to(weight.dtype) if ctx.needs_input_grad[1] else None), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             cast_before_weight: bool = True) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape): ``offset=0, cast_before_weight=True`` is
    LlamaRMSNorm (Llama, Qwen, Mistral); ``offset=1, cast_before_weight=False`` is Gemma3RMSNorm."""
    if x.dim() == 0:
        raise ValueError("sloth.rms_norm: x must have at least one dimension (the normalized last one), got a 0-d "
                         "tensor")
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # [rows, H] (not -1: H may be 0)
    y = RMSNormFunction.apply(x2, weight, float(eps), float(offset), bool(cast_before_weight))
    return y.view(x.shape)


class RopeFunction(torch.autograd.Function):
    """Rotates x [tokens, heads, D] in place (marked dirty; x may be a view); backward rotates the incoming
    grad back (the transpose) into a new tensor. One tensor per call: autograd allows in-place on a view only for
    single outputs. Eager mode only: under torch.compile use :class:`RopeOutFunction` (an in-place rotation of a
    view that the compiled graph returns as a new tensor gave wrong gradients)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        rope_(x, _no_heads(x), cos, sin, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dx):
        cos, sin = ctx.saved_tensors
        return _rotate_back(dx, cos, sin), None, None


class RopeOutFunction(torch.autograd.Function):
    """x [tokens, heads, D] -> its rotation, a new contiguous tensor (x is only read): the functional form that
    torch.compile traces (no mutation); backward as :class:`RopeFunction`."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_out(x, _no_heads(x), cos, sin, False)[0]

    @staticmethod
    def backward(ctx, dx):
        cos, sin = ctx.saved_tensors
        return _rotate_back(dx, cos, sin), None, None


def _rotate_back(dx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transposed rotation of dx [tokens, heads, D] into a new contiguous tensor: one read and one write
    whatever dx's layout (e.g. the gradient of q / k viewed out of SDPA's [B, heads, T, D]); dx is never written."""
    if dx.stride(-1) != 1:
        dx = dx.contiguous()
    return rope_out(dx, _no_heads(dx), cos, sin, True)[0]


def _no_heads(x: torch.Tensor) -> torch.Tensor:
    """An empty [tokens, 0, D] partner for the RoPE ops (which rotate a q and a k together)."""
    return x.new_empty((x.shape[0], 0, x.shape[2]))


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b certainly overlap (one storage and: the same first element, or intersecting byte
    ranges of two dense tensors); views that interleave without overlapping (q, k of a fused projection) pass."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.data_ptr() == b.data_ptr():
        return True
    dense = all(t.is_contiguous() for t in (a, b))
    return dense and a.data_ptr() < b.data_ptr() + b.numel() * b.element_size() and \
        b.data_ptr() < a.data_ptr() + a.numel() * a.element_size()


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on ``q [tokens, heads, D]`` and ``k [tokens, kv_heads, D]`` (HF rotate_half, partial rotary: the first
    ``cos.shape[-1]`` dims), differentiable; returns the rotated (q, k). In eager mode q and k are rotated in place
    (they may be views, e.g. of the projections' output; they must not share memory); under torch.compile the
    results are new tensors and q, k are left as they were: use the returned values."""
    cos, sin = cos.float().contiguous(), sin.float().contiguous()  # once for both calls (the kernel reads fp32)
    if torch.compiler.is_compiling():
        return RopeOutFunction.apply(q, cos, sin), RopeOutFunction.apply(k, cos, sin)
    if _shares_memory(q, k):
        raise ValueError("sloth.rope: q and k share memory, so the in-place rotation would rotate it twice; "
                         "pass distinct tensors (e.g. k.clone())")
    return RopeFunction.apply(q, cos, sin), RopeFunction.apply(k, cos, sin)
