"""Plain-PyTorch attention with sinks, sliding window, softcap, GQA and packed sequences (the oracle of
torch.ops.sloth.attention_*): computes in the dtype it is given (pass float64 for the tests' oracle).

Conventions (those of the kernels):
- causal masking is aligned to the bottom right: query i of a document with Lq queries and Lk keys sees key j
  iff j <= i + (Lk - Lq) (the usual training case Lq == Lk is plain causal masking);
- ``window`` (Transformers' convention) keeps key j iff j > i + (Lk - Lq) - window: a query sees itself and the
  window - 1 keys before it;
- ``softcap``: scores become softcap * tanh(score / softcap) after scaling;
- ``sinks`` [q_heads]: one extra logit per head in the softmax denominator, with a zero value vector;
- ``lse`` is the natural log-sum-exp of the row's scores, the sink included (-inf for a row that sees nothing).
"""

from __future__ import annotations

import math

import torch


def _one_document(q, k, v, sinks, scale, causal, window, softcap):
    """q [Lq, Hq, D], k / v [Lk, Hkv, D] -> out [Lq, Hq, D], lse [Hq, Lq]."""
    Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[0], k.shape[1]
    group = Hq // Hkv
    kk = k.repeat_interleave(group, dim=1)  # [Lk, Hq, D]
    vv = v.repeat_interleave(group, dim=1)
    s = torch.einsum("ihd,jhd->hij", q, kk) * scale  # [Hq, Lq, Lk]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=q.device)[None, :]
    keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= j > i - window
    s = s.masked_fill(~keep, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[:, None, None].expand(Hq, Lq, 1)], dim=-1)  # [Hq, Lq, Lk + 1]
    lse = torch.logsumexp(s, dim=-1)  # [Hq, Lq]
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows that see nothing: all zero
    if sinks is not None:
        p = p[..., :-1]
    out = torch.einsum("hij,jhd->ihd", p, vv)
    return out, lse


def attention(q, k, v, *, causal=True, window=None, sinks=None, softcap=None, scale=None, cu_seqlens_q=None,
              cu_seqlens_k=None):
    """out (q's shape and dtype) and lse (fp64 / fp32 as q: [batch, q_heads, seq_q], or [q_heads, tokens_q]
    when packed).

    q [batch, seq_q, q_heads, D] and k / v [batch, seq_k, kv_heads, D]; or packed q [tokens_q, q_heads, D],
    k / v [tokens_k, kv_heads, D] with cu_seqlens_q / cu_seqlens_k [docs + 1] (document d holds tokens
    cu_seqlens[d] : cu_seqlens[d + 1]). Differentiable by autograd in every input, sinks included."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens_q is None:
        outs, lses = zip(*(_one_document(q[b], k[b], v[b], sinks, scale, causal, window, softcap)
                           for b in range(q.shape[0])))
        return torch.stack(outs), torch.stack(lses)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for d in range(len(cq) - 1):
        o, l = _one_document(q[cq[d]:cq[d + 1]], k[ck[d]:ck[d + 1]], v[ck[d]:ck[d + 1]], sinks, scale, causal,
                             window, softcap)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses, dim=1)
