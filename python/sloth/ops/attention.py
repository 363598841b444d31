"""Attention with per-head sinks, sliding window, softcap, GQA and packed documents
(``torch.ops.sloth.attention_forward`` / ``attention_backward``).

Layouts: dense q [batch, seq_q, q_heads, D], k / v [batch, seq_k, kv_heads, D]; or packed q [tokens_q, q_heads, D],
k / v [tokens_k, kv_heads, D] with ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32 [docs + 1]). Conventions: see
:mod:`sloth.reference.attention`.
"""

from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, check_device_supported, check_tensor

#: head dims the GPU kernels are built for (the CPU kernel takes any)
GPU_HEAD_DIMS = (64, 128, 256)
GPU_DTYPES = (torch.float16, torch.bfloat16)


def _capturing() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_cu_seqlens(name: str, cu, tokens: int, max_seqlen, device) -> int:
    check_tensor(name, cu, dtypes=(torch.int32,), dim=1, device=device)
    if cu.numel() < 2:
        raise ValueError(f"sloth: {name} must hold [0, end of document 1, ...], at least 2 entries; got {cu.numel()}")
    if _capturing():  # values cannot be read back here; max_seqlen must then be given
        if max_seqlen is None:
            raise ValueError(f"sloth: pass max_seqlen for {name} under torch.compile / CUDA graph capture")
        return int(max_seqlen)
    c = cu.tolist()
    if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"sloth: {name} must start at 0 and never decrease; got {c[:8]}{'...' if len(c) > 8 else ''}")
    if c[-1] != tokens:
        raise ValueError(f"sloth: {name} ends at {c[-1]} but the tensor holds {tokens} tokens; they must agree")
    longest = max(b - a for a, b in zip(c, c[1:]))
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(f"sloth: max_seqlen for {name} is {max_seqlen} but a document has {longest} tokens")
    return int(max_seqlen)


def check_attention(q, k, v, *, window=None, sinks=None, softcap=None, scale=None, cu_seqlens_q=None,
                    cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """Validate the arguments (one clear error each) and return (max_seqlen_q, max_seqlen_k) (0, 0 when dense)."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, dtypes=(q.dtype,), device=q.device)
    varlen = cu_seqlens_q is not None
    if (cu_seqlens_k is not None) != varlen:
        raise ValueError("sloth: pass both cu_seqlens_q and cu_seqlens_k (packed documents), or neither")
    nd = 3 if varlen else 4
    layout = "[tokens, heads, head_dim] with cu_seqlens" if varlen else "[batch, seq, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != nd:
            raise ValueError(f"sloth: {name} must be {layout}; got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"sloth: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"sloth: q and k must share head_dim; got {q.shape[-1]} and {k.shape[-1]}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"sloth: q and k must share the batch size; got {q.shape[0]} and {k.shape[0]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"sloth: q_heads ({hq}) must be a multiple of kv_heads ({hkv})")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ValueError(f"sloth: window must be a positive int (tokens a query sees, itself included) or None; "
                         f"got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"sloth: softcap must be > 0 or None; got {softcap!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"sloth: scale must be > 0 or None; got {scale!r}")
    if sinks is not None:
        check_tensor("sinks", sinks, dtypes=(torch.float32,), dim=1, device=q.device)
        if sinks.shape[0] != hq:
            raise ValueError(f"sloth: sinks must have one logit per query head, [{hq}]; got {tuple(sinks.shape)}")
    if q.device.type == "cuda":
        if q.dtype not in GPU_DTYPES:
            raise TypeError(f"sloth: attention on the GPU takes bfloat16 or float16 q / k / v; got {q.dtype} "
                            "(cast them, e.g. under torch.autocast)")
        if q.shape[-1] not in GPU_HEAD_DIMS:
            raise ValueError(f"sloth: attention on the GPU supports head_dim {GPU_HEAD_DIMS}; got {q.shape[-1]} "
                             "(use SDPA for this model)")
    check_device_supported(q, "attention")
    if not varlen:
        return 0, 0
    return (_check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device),
            _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device))


def attention_forward(q, k, v, *, causal=True, window=None, sinks=None, softcap=None, scale=None, cu_seqlens_q=None,
                      cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """(out, lse): out like q, lse fp32 [batch, q_heads, seq_q] (packed: [q_heads, tokens_q]), sink included.
    Traffic (GPU): reads q once and k / v once per query block that sees them, writes out and lse."""
    mq, mk = check_attention(q, k, v, window=window, sinks=sinks, softcap=softcap, scale=scale,
                             cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                             max_seqlen_k=max_seqlen_k)
    return forward_checked(q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, mq, mk, causal, window, softcap, scale)


def forward_checked(q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, softcap,
                    scale):
    """attention_forward on arguments check_attention accepted (max_seqlen as it returned them)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.sloth.attention_forward(q, k, v, sinks, cu_seqlens_q,
                                             cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale, bool(causal),
                                             -1 if window is None else int(window), float(softcap or 0.0))


def attention_backward(dout, q, k, v, out, lse, *, causal=True, window=None, sinks=None, softcap=None, scale=None,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """(dq, dk, dv, dsinks): shaped as q, k, v and fp32 [q_heads] ([0] without sinks).
    Traffic (GPU): reads q, dout, out once per key block that they see and k / v once; writes dq (through an fp32
    buffer), dk, dv."""
    mq, mk = check_attention(q, k, v, window=window, sinks=sinks, softcap=softcap, scale=scale,
                             cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                             max_seqlen_k=max_seqlen_k)
    return backward_checked(dout, q, k, v, out, lse, sinks, cu_seqlens_q, cu_seqlens_k, mq, mk, causal, window,
                            softcap, scale)


def backward_checked(dout, q, k, v, out, lse, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                     window, softcap, scale):
    """attention_backward on arguments check_attention accepted."""
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"sloth: dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape "
                         f"{tuple(q.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.sloth.attention_backward(
        dout.to(q.dtype), q, k, v, out, lse,
        sinks, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale, bool(causal),
        -1 if window is None else int(window), float(softcap or 0.0))


def _lse_shape(q, cu_seqlens_q):
    if cu_seqlens_q is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


@torch.library.register_fake("sloth::attention_forward")
def _(q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, window, softcap):
    return (q.new_empty(q.shape),
            q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32))


@torch.library.register_fake("sloth::attention_backward")
def _(dout, q, k, v, out, lse, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, window,
      softcap):
    return (q.new_empty(q.shape),
            k.new_empty(k.shape),
            v.new_empty(v.shape),
            q.new_empty((sinks.shape[0] if sinks is not None else 0,), dtype=torch.float32))
