"""Differentiable RMSNorm and RoPE on torch.ops.sloth (one kernel each way)."""

from __future__ import annotations

import torch

from ..ops.norm_rope import rms_norm_backward, rms_norm_forward, rope_


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
    y = RMSNormFunction.apply(x.reshape(-1, x.shape[-1]), weight, float(eps), float(offset), bool(cast_before_weight))
    return y.view(x.shape)


class RopeFunction(torch.autograd.Function):
    """Rotates x [tokens, heads, D] in place (marked dirty; x may be a view); backward rotates the incoming
    grad back (the transpose). One tensor per call: autograd allows in-place on a view only for single outputs."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        rope_(x, _no_heads(x), cos, sin, False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dx):
        cos, sin = ctx.saved_tensors
        # one copy whatever dx's layout (``dx.contiguous().clone()`` made two for a strided dx, e.g. the gradient
        # of q / k viewed out of SDPA's [B, heads, T, D]); rotated in place, dx itself is never written
        g = dx.clone(memory_format=torch.contiguous_format)  # [tokens, heads, D]
        rope_(g, _no_heads(g), cos, sin, True)
        return g, None, None


def _no_heads(x: torch.Tensor) -> torch.Tensor:
    """An empty [tokens, 0, D] partner for rope_ (which rotates a q and a k together)."""
    return x.new_empty((x.shape[0], 0, x.shape[2]))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """In-place RoPE on ``q [tokens, heads, D]`` and ``k [tokens, kv_heads, D]`` (HF rotate_half, partial
    rotary: the first ``cos.shape[-1]`` dims; q / k may be views, e.g. of the projections' output); returns
    (q, k), differentiable."""
    cos, sin = cos.float().contiguous(), sin.float().contiguous()  # once for both calls (the kernel reads fp32)
    return RopeFunction.apply(q, cos, sin), RopeFunction.apply(k, cos, sin)
