"""Per-token log-probs (and entropies) of softmax(h W^T / temperature), chunked, for RL losses."""

from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_linear_head
from ._chunking import chunk_logits, fold_chunk_grads, prepare_head_inputs

#: Tokens equal to this give log-prob 0, entropy still computed, and no gradient (padding).
PAD_TOKEN = -100


class LinearLogprobsFunction(torch.autograd.Function):
    """(log-prob [tokens], entropy [tokens]); backward recomputes each chunk's logits (per-token upstream grads)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, logit_scale, chunk, needs):
        # hidden [tokens, hidden], weight [vocab, hidden], bias [vocab] | None, tokens [tokens] int64
        n, v = hidden.shape[0], weight.shape[0]
        logp = hidden.new_empty((n,), dtype=torch.float32)  # [tokens]
        entropy = hidden.new_empty((n,), dtype=torch.float32)  # [tokens]
        if n > 0:
            buf = hidden.new_empty((min(chunk, n), v))  # [chunk, vocab]
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                lg = chunk_logits(hidden[s:e], weight, bias, buf[: e - s])
                nll, _, ent = torch.ops.sloth.cross_entropy_chunk(
                    lg, tokens[s:e], None, None, 1.0, PAD_TOKEN, 0.0, logit_scale, False)
                torch.neg(nll, out=logp[s:e])
                entropy[s:e] = ent
        ctx.save_for_backward(hidden, weight, bias, tokens)
        ctx.logit_scale, ctx.chunk, ctx.needs = logit_scale, chunk, needs
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, tokens = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs
        if (g_logp is None and g_entropy is None) or not any(ctx.needs):
            return None, None, None, None, None, None, None
        n, v = hidden.shape[0], weight.shape[0]
        # d logp / d z = onehot - p, i.e. the kernel's (p - onehot) weighted by -g_logp.
        g_nll = None if g_logp is None else -g_logp.float()  # [tokens]
        g_ent = None if g_entropy is None else g_entropy.float()  # [tokens]
        if g_nll is None:
            g_nll = torch.zeros((n,), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_dh else None  # [tokens, hidden]
        dw = torch.zeros_like(weight) if need_dw else None  # [vocab, hidden]; see linear_cross_entropy for dtype
        db = torch.zeros((v,), dtype=torch.float32, device=hidden.device) if need_db else None
        chunk = ctx.chunk
        if n > 0:
            buf = hidden.new_empty((min(chunk, n), v))  # [chunk, vocab]
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                h_c = hidden[s:e]
                lg = chunk_logits(h_c, weight, bias, buf[: e - s])
                torch.ops.sloth.cross_entropy_chunk(
                    lg, tokens[s:e], g_nll[s:e], None if g_ent is None else g_ent[s:e], 1.0, PAD_TOKEN, 0.0,
                    ctx.logit_scale, True)
                fold_chunk_grads(lg, h_c, weight, dh[s:e] if need_dh else None, dw, db)
        if db is not None:
            db = db.to(bias.dtype)
        return dh, dw, db, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
):
    """Log-probability of ``tokens`` under ``softmax((hidden @ weight.T + bias) / temperature)``, chunked.

    Shapes: ``hidden [..., H]``, ``weight [V, H]`` (same dtype), ``bias [V]``, ``tokens [...]`` integer. Returns fp32
    log-probs ``[...]``, and with ``return_entropy`` also the fp32 entropies ``[...]`` of the same distributions.
    Differentiable in hidden, weight and bias (backward recomputes the logits chunk by chunk); the logits are
    never materialized. Tokens equal to -100 (padding) give log-prob 0 and no gradient.
    """
    check_linear_head("linear_logprobs", hidden, weight, tokens, bias, labels_name="tokens")
    if not temperature > 0:
        raise ValueError(f"sloth.linear_logprobs: temperature must be positive, got {temperature}")
    lead = hidden.shape[:-1]
    h2, tok, needs, chunk = prepare_head_inputs(hidden, weight, bias, tokens, chunk_size)
    logp, entropy = LinearLogprobsFunction.apply(h2, weight, bias, tok, 1.0 / float(temperature), chunk, needs)
    logp = logp.reshape(lead)
    if return_entropy:
        return logp, entropy.reshape(lead)
    return logp
