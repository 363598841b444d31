"""Differentiable attention with sinks, sliding window, softcap, GQA and packed documents (one kernel each way).

The forward saves q, k, v, out and the fp32 lse (O(tokens) extra, no [seq, seq] buffer); the backward recomputes
the probabilities block by block and returns dq, dk, dv and dsinks."""

from __future__ import annotations

import torch

from ..ops.attention import backward_checked, check_attention, forward_checked


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, softcap,
                scale):
        sinks32 = None if sinks is None else sinks.float()
        mq, mk = check_attention(q, k, v, window=window, sinks=sinks32, softcap=softcap, scale=scale,
                                 cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                 max_seqlen_k=max_seqlen_k)
        out, lse = forward_checked(q, k, v, sinks32, cu_seqlens_q, cu_seqlens_k, mq, mk, causal, window, softcap,
                                   scale)
        ctx.save_for_backward(q, k, v, out, lse, sinks32, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (mq, mk, causal, window, softcap, scale)
        ctx.sinks_dtype = None if sinks is None else sinks.dtype
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks32, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv, dsinks = backward_checked(dout, q, k, v, out, lse, sinks32, cu_q, cu_k, *ctx.args)
        dsinks = None if sinks32 is None else dsinks.to(ctx.sinks_dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, window: int | None = None,
              sinks: torch.Tensor | None = None, softcap: float | None = None, scale: float | None = None,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, return_lse: bool = False):
    """Softmax attention, differentiable in q, k, v and sinks.

    q [batch, seq_q, q_heads, D], k / v [batch, seq_k, kv_heads, D] (q_heads a multiple of kv_heads); or packed
    q [tokens_q, q_heads, D], k / v [tokens_k, kv_heads, D] with cu_seqlens_q / cu_seqlens_k (int32 [docs + 1];
    no token attends across documents). ``causal`` (bottom-right aligned), ``window`` (a query sees itself and
    the window - 1 keys before it, Transformers' sliding_window), ``sinks`` [q_heads] (one learned logit per
    head in the softmax denominator, any float dtype), ``softcap`` (tanh capping of the scaled scores),
    ``scale`` (default head_dim ** -0.5). Returns out (q's shape and dtype), and with ``return_lse`` also the
    fp32 log-sum-exp ([batch, q_heads, seq_q], packed [q_heads, tokens_q], sink included)."""
    out, lse = AttentionFunction.apply(q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       causal, window, softcap, scale)
    return (out, lse) if return_lse else out
