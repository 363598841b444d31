"""Per-token log-probs (and entropies) of softmax(h W^T / temperature), chunked, for RL losses.

Besides the log-prob and the entropy, the forward pass can return a few no-grad per-token statistics of the
same distributions, read off each chunk of logits while it is alive (TRL's fused LM head asks for them):
``is_top1`` (the token is the arg-max), ``mean_logits`` (mean of the scaled logits over the vocabulary) and
``log_sum_sq_probs`` (``log sum_v p_v^2``).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ._checks import check_linear_head
from ._chunking import chunk_logits, fold_chunk_grads, online_rows, prepare_head_inputs
from ._online_head import online_head_grad

#: Tokens equal to this give log-prob 0, entropy still computed, and no gradient (padding).
PAD_TOKEN = -100
#: The no-grad per-token statistics :func:`linear_logprobs_stats` can add (besides log_probs and entropy).
STATS = ("is_top1", "mean_logits", "log_sum_sq_probs")


def _chunk_stats(lg, tokens, lse, logit_scale, softcap, stats, out, s, e):
    """Fill rows [s, e) of the requested ``stats`` from one chunk of raw logits ``lg [c, V]`` (unmodified)."""
    if "is_top1" in stats:  # the scaling and the softcap are increasing: the arg-max of the raw logits
        out["is_top1"][s:e] = lg.argmax(-1) == tokens
    need_z = "log_sum_sq_probs" in stats or ("mean_logits" in stats and softcap)
    z = None
    if need_z:
        z = lg.float() * logit_scale  # [c, V] fp32
        if softcap:
            z = torch.tanh(z / softcap).mul_(softcap)
    if "mean_logits" in stats:
        if z is None:
            out["mean_logits"][s:e] = lg.sum(-1, dtype=torch.float32) * (logit_scale / lg.shape[1])
        else:
            out["mean_logits"][s:e] = z.mean(-1)
    if "log_sum_sq_probs" in stats:  # log sum_v exp(2 z_v - 2 lse)
        out["log_sum_sq_probs"][s:e] = torch.logsumexp(z.mul_(2.0), -1) - 2.0 * lse


class LinearLogprobsFunction(torch.autograd.Function):
    """(log-prob [tokens], entropy [tokens]); backward recomputes each chunk's logits (per-token upstream grads):
    on the online path (_online_head, ``online_chunk`` rows) when only dh is wanted and the entropy has no
    gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, logit_scale, chunk, needs, softcap=0.0, stats=(),
                online_chunk=None):
        # hidden [tokens, hidden], weight [vocab, hidden], bias [vocab] | None, tokens [tokens] int64;
        # z = softcap * tanh(logit_scale * logits / softcap) (no tanh when softcap is 0); stats: names in STATS
        n, v = hidden.shape[0], weight.shape[0]
        logp = hidden.new_empty((n,), dtype=torch.float32)  # [tokens]
        entropy = hidden.new_empty((n,), dtype=torch.float32)  # [tokens]
        extra = {k: hidden.new_zeros((n,), dtype=torch.bool if k == "is_top1" else torch.float32) for k in stats}
        if n > 0:
            buf = hidden.new_empty((min(chunk, n), v))  # [chunk, vocab]
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                lg = chunk_logits(hidden[s:e], weight, bias, buf[: e - s])
                nll, lse, ent = torch.ops.sloth.cross_entropy_chunk(
                    lg, tokens[s:e], None, None, 1.0, PAD_TOKEN, softcap, logit_scale, False)
                torch.neg(nll, out=logp[s:e])
                entropy[s:e] = ent
                if stats:
                    _chunk_stats(lg, tokens[s:e], lse, logit_scale, softcap, stats, extra, s, e)
        ctx.save_for_backward(hidden, weight, bias, tokens)
        ctx.logit_scale, ctx.softcap, ctx.chunk, ctx.needs = logit_scale, softcap, chunk, needs
        ctx.online_chunk = online_chunk
        ctx.set_materialize_grads(False)
        if stats:
            ctx.mark_non_differentiable(*extra.values())
        return (logp, entropy, *extra.values())

    @staticmethod
    def backward(ctx, g_logp, g_entropy, *_g_stats):
        hidden, weight, bias, tokens = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs
        nones = (None,) * 7
        if (g_logp is None and g_entropy is None) or not any(ctx.needs):
            return None, None, None, *nones
        n, v = hidden.shape[0], weight.shape[0]
        # d logp / d z = onehot - p, i.e. the kernel's (p - onehot) weighted by -g_logp.
        g_nll = None if g_logp is None else -g_logp.float()  # [tokens]
        g_ent = None if g_entropy is None else g_entropy.float()  # [tokens]
        if g_nll is None:
            g_nll = torch.zeros((n,), dtype=torch.float32, device=hidden.device)
        if g_ent is None and ctx.online_chunk:  # set only when dh alone is wanted
            _, dh = online_head_grad(hidden, weight, bias, tokens, PAD_TOKEN, ctx.softcap, ctx.logit_scale,
                                     ctx.online_chunk, row_scale=g_nll)
            return dh, None, None, *nones
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
                    lg, tokens[s:e], g_nll[s:e], None if g_ent is None else g_ent[s:e], 1.0, PAD_TOKEN,
                    ctx.softcap, ctx.logit_scale, True)
                fold_chunk_grads(lg, h_c, weight, dh[s:e] if need_dh else None, dw, db)
        if db is not None:
            db = db.to(bias.dtype)
        return dh, dw, db, *nones


def _scales(op, temperature, softcap, logit_scale):
    """(logit_scale, softcap) of the kernel for ``softcap(logit_scale * logits) / temperature``: dividing a
    softcapped logit by t is softcapping the logit divided by t with the cap divided by t."""
    if not temperature > 0:
        raise ValueError(f"sloth.{op}: temperature must be positive, got {temperature}")
    if softcap is not None and softcap < 0:
        raise ValueError(f"sloth.{op}: softcap must be positive, got {softcap}")
    scale = (1.0 if logit_scale is None else float(logit_scale)) / float(temperature)
    cap = float(softcap) / float(temperature) if softcap else 0.0
    return scale, cap


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
):
    """Log-probability of ``tokens`` under ``softmax(z / temperature)``, ``z = hidden @ weight.T + bias``, chunked.

    Shapes: ``hidden [..., H]``, ``weight [V, H]`` (same dtype), ``bias [V]``, ``tokens [...]`` integer. Returns fp32
    log-probs ``[...]``, and with ``return_entropy`` also the fp32 entropies ``[...]`` of the same distributions.
    Differentiable in hidden, weight and bias (backward recomputes the logits chunk by chunk); the logits are
    never materialized. Tokens equal to -100 (padding) give log-prob 0 and no gradient. ``logit_scale``
    multiplies the logits and ``softcap`` caps them (``softcap * tanh(z / softcap)``, Gemma) before the
    temperature divides them.
    """
    check_linear_head("linear_logprobs", hidden, weight, tokens, bias, labels_name="tokens")
    scale, cap = _scales("linear_logprobs", temperature, softcap, logit_scale)
    lead = hidden.shape[:-1]
    h2, tok, needs, chunk = prepare_head_inputs(hidden, weight, bias, tokens, chunk_size)
    online = online_rows(h2, weight, needs, chunk_size)  # the backward's, when only dh is wanted
    logp, entropy = LinearLogprobsFunction.apply(h2, weight, bias, tok, scale, chunk, needs, cap, (), online)
    logp = logp.reshape(lead)
    if return_entropy:
        return logp, entropy.reshape(lead)
    return logp


def linear_logprobs_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    stats: Sequence[str] = (),
    chunk_size: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """:func:`linear_logprobs` with its entropy and the no-grad per-token ``stats`` (names in :data:`STATS`:
    ``is_top1`` bool, ``mean_logits`` and ``log_sum_sq_probs`` fp32) of the same distributions, from the same
    chunks of logits (one GEMM per chunk). Returns a dict with ``log_probs``, ``entropy`` (both differentiable)
    and each requested statistic, each of shape ``tokens.shape``."""
    check_linear_head("linear_logprobs_stats", hidden, weight, tokens, bias, labels_name="tokens")
    unknown = [k for k in stats if k not in STATS]
    if unknown:
        raise ValueError(f"sloth.linear_logprobs_stats: unknown statistic {unknown[0]!r}; expected some of {STATS}")
    scale, cap = _scales("linear_logprobs_stats", temperature, softcap, logit_scale)
    stats = tuple(k for k in STATS if k in stats)
    lead = hidden.shape[:-1]
    h2, tok, needs, chunk = prepare_head_inputs(hidden, weight, bias, tokens, chunk_size)
    online = online_rows(h2, weight, needs, chunk_size)  # the backward's, when only dh is wanted
    outs = LinearLogprobsFunction.apply(h2, weight, bias, tok, scale, chunk, needs, cap, stats, online)
    names = ("log_probs", "entropy", *stats)
    return {k: t.reshape(lead) for k, t in zip(names, outs)}
