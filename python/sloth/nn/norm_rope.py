"""Differentiable RMSNorm and RoPE on torch.ops.sloth (one kernel each way)."""

from __future__ import annotations

import torch

from ..ops.norm_rope import rms_norm_backward, rms_norm_forward, rope_


class RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * (offset + w) over the last dim; saves x and rstd; dw is accumulated in fp32."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float, cast_before_weight: bool):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y, rstd = rms_norm_forward(x2, weight, eps, offset, cast_before_weight)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.cast_before_weight, ctx.shape = offset, cast_before_weight, shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        dx, dw = rms_norm_backward(dy2, x2, weight, rstd, ctx.offset, ctx.cast_before_weight,
                                   ctx.needs_input_grad[1])
        return dx.reshape(ctx.shape), (dw.to(weight.dtype) if ctx.needs_input_grad[1] else None), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             cast_before_weight: bool = True) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape): ``offset=0, cast_before_weight=True`` is
    LlamaRMSNorm (Llama, Qwen, Mistral); ``offset=1, cast_before_weight=False`` is Gemma3RMSNorm."""
    return RMSNormFunction.apply(x, weight, float(eps), float(offset), bool(cast_before_weight))


class RopeFunction(torch.autograd.Function):
    """Rotates q and k in place (marked dirty); backward rotates the incoming grads back (transpose)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        rope_(q, k, cos, sin, False)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        if dq is None and dk is None:
            return None, None, None, None
        ref = dq if dq is not None else dk
        empty = ref.new_empty((ref.shape[0], 0, ref.shape[2]))  # a grad that is None rotates to None
        gq = dq.contiguous().clone() if dq is not None else empty
        gk = dk.contiguous().clone() if dk is not None else empty
        rope_(gq, gk, cos, sin, True)
        return (gq if dq is not None else None), (gk if dk is not None else None), None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """In-place RoPE on ``q [tokens, heads, D]`` and ``k [tokens, kv_heads, D]`` (HF rotate_half, partial
    rotary: the first ``cos.shape[-1]`` dims); returns (q, k), differentiable."""
    return RopeFunction.apply(q, k, cos, sin)
