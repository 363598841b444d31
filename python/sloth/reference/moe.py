"""Plain-PyTorch mixture-of-experts ops: the oracle of sloth's MoE kernels (python/sloth/ops/moe.py).

Everything here is a per-expert loop in the dtype of its inputs (pass float64 for the tests' oracle) and is
differentiable with torch autograd, so the oracle's gradients are autograd's.

Conventions (the same as the kernels'):
  * routing ``kind`` 0 (Qwen3-MoE): p = softmax(logits) in fp32, top-k of p, optionally renormalized to sum 1;
    ``kind`` 1 (gpt-oss): top-k of the logits, softmax over those k. Ties go to the lower expert index.
  * the T * k (token, slot) pairs are flattened slot = t * k + j; ``permute`` sorts them by expert, stably
    (slots of one expert stay in slot order).
  * an expert weight is stored [E, A, B]; ``trans=False`` computes y = x W[e]^T (out = A, in = B),
    ``trans=True`` y = x W[e] (out = B, in = A). NF4 / MXFP4 weights always quantize along B.
  * GLU kinds: 0 none, 1 SwiGLU with [gate; up] concatenated on the output dim, 2 SwiGLU interleaved
    (gate = even, up = odd columns), 3 gpt-oss clamped GLU interleaved, 4 gpt-oss clamped GLU concatenated.
"""

from __future__ import annotations

import torch

from . import mxfp4 as _mxfp4
from . import nf4 as _nf4

GLU_NONE, GLU_SWIGLU, GLU_SWIGLU_INTERLEAVED, GLU_CLAMPED_INTERLEAVED, GLU_CLAMPED = 0, 1, 2, 3, 4


def route(logits: torch.Tensor, top_k: int, kind: int, renormalize: bool = False):
    """(weights [T, k] fp32 (float64 for float64 logits), ids [T, k] int64) of the two routing conventions."""
    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(work)
    if kind == 0:
        p = torch.softmax(z, dim=-1)
        order = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :top_k]  # ties: lower index
        w = p.gather(1, order)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
    elif kind == 1:
        order = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :top_k]
        w = torch.softmax(z.gather(1, order), dim=-1)
    else:
        raise ValueError(f"unknown routing kind {kind}")
    return w, order


def permute(ids: torch.Tensor, num_experts: int):
    """(sorted_slots [R], slot_pos [R], offsets [E + 1]) for ids [T, k], R = T * k, all int64:
    sorted_slots[r] is the slot at sorted position r, slot_pos its inverse, offsets the expert boundaries."""
    flat = ids.reshape(-1).long()
    sorted_slots = torch.sort(flat, stable=True).indices
    slot_pos = torch.empty_like(sorted_slots)
    slot_pos[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return sorted_slots, slot_pos, offsets


def dequantize_weight(fmt: str, data: torch.Tensor, shape, dtype=torch.float32, **q) -> torch.Tensor:
    """The [E, A, B] weight of a dense / NF4 / MXFP4 expert stack, in dtype (quantized values rounded to
    ``q['round_to']`` first when given: the kernels feed the GEMM with weights in the activations' dtype)."""
    E, A, B = shape
    if fmt == "dense":
        w = data.to(torch.float64)
    elif fmt == "nf4":
        offset = q.get("offset")
        per_expert = offset is not None and offset.numel() == E and E > 1
        if per_expert:  # one quantization per expert: each expert's slice of absmax / absmax2
            nb = A * B // q["blocksize"]
            nb2 = -(-nb // q.get("blocksize2", 256))
            w = torch.stack([
                _nf4.nf4_dequantize(data.reshape(-1)[e * A * B // 2:(e + 1) * A * B // 2], q["absmax"][e * nb:(e + 1) * nb],
                                    (A, B), q["blocksize"], torch.float32, q["code2"],
                                    q["absmax2"][e * nb2:(e + 1) * nb2], offset.reshape(-1)[e], q.get("blocksize2", 256))
                for e in range(E)]).double()
        else:
            w = _nf4.nf4_dequantize(data, q["absmax"], (E, A, B), q["blocksize"], torch.float32, q.get("code2"),
                                    q.get("absmax2"), None if offset is None else offset.reshape(()),
                                    q.get("blocksize2", 256)).double()
    elif fmt == "mxfp4":
        w = _mxfp4.mxfp4_dequantize(data, q["scales"], torch.float32).double()
    else:
        raise ValueError(f"unknown weight format {fmt}")
    if q.get("round_to") is not None and fmt != "dense":
        w = w.to(q["round_to"]).double()
    return w.to(dtype)


def glu(pre: torch.Tensor, kind: int, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """[R, 2I] pre-activations -> [R, I] for GLU kind 1-4 (see the module docstring); kind 0 returns pre."""
    if kind == GLU_NONE:
        return pre
    if kind in (GLU_SWIGLU, GLU_CLAMPED):
        gate, up = pre.chunk(2, dim=-1)
    else:
        gate, up = pre[..., 0::2], pre[..., 1::2]
    if kind in (GLU_SWIGLU, GLU_SWIGLU_INTERLEAVED):
        return torch.nn.functional.silu(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def grouped_gemm(x, offsets, weight, *, rows=None, trans=False, bias=None, lora_A=None, lora_B=None,
                 scaling=1.0, glu_kind=0, alpha=1.702, limit=7.0):
    """Per-expert loop: row r of the (gathered: x[rows[r]]) input, in expert e's range of offsets, becomes
    glu(x_r W_e^T + bias[e] + scaling * (x_r A_e^T) B_e^T) (W_e^T -> W_e when trans). weight is the dense
    [E, A, B] stack (dequantize_weight), lora_A [E, r, in], lora_B [E, out, r]. Returns (out, pre)."""
    xs = x if rows is None else x[rows]
    outs = []
    for e in range(weight.shape[0]):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        xe = xs[lo:hi]
        w = weight[e] if trans else weight[e].t()  # [in, out]
        y = xe @ w
        if bias is not None:
            y = y + bias[e]
        if lora_A is not None:
            y = y + scaling * ((xe @ lora_A[e].t()) @ lora_B[e].t())
        outs.append(y)
    pre = torch.cat(outs) if outs else xs.new_zeros(0, weight.shape[1 if not trans else 2])
    return glu(pre, glu_kind, alpha, limit), pre


def combine(y: torch.Tensor, slot_pos: torch.Tensor, weights, top_k: int) -> torch.Tensor:
    """out [T, H] = sum_j weights[t, j] * y[slot_pos[t * k + j]] (weights None: plain sum)."""
    g = y[slot_pos].reshape(-1, top_k, y.shape[-1])
    if weights is not None:
        g = g * weights.reshape(-1, top_k, 1).to(g.dtype)
    return g.sum(dim=1)


def experts_forward(x, ids, weights, gate_up, down, *, gate_up_trans=False, down_trans=False, gate_up_bias=None,
                    down_bias=None, glu_kind=GLU_SWIGLU, alpha=1.702, limit=7.0, lora=None, scaling=1.0):
    """The whole experts block as a per-expert loop, the way Transformers' eager experts compute it:
    out[t] = sum_j w[t, j] * down_e(glu(gate_up_e(x[t]))) with e = ids[t, j]. gate_up / down are dense
    [E, A, B] stacks; lora is None or dict(gate_up=(A, B), down=(A, B)) of 3-D per-expert factors."""
    T, k = ids.shape
    out = x.new_zeros(x.shape)
    lora = lora or {}
    for e in range(gate_up.shape[0]):
        tok, j = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        h = xe @ (gate_up[e] if gate_up_trans else gate_up[e].t())
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        if "gate_up" in lora:
            A, B = lora["gate_up"]
            h = h + scaling * (xe @ A[e].t()) @ B[e].t()
        a = glu(h, glu_kind, alpha, limit)
        y = a @ (down[e] if down_trans else down[e].t())
        if down_bias is not None:
            y = y + down_bias[e]
        if "down" in lora:
            A, B = lora["down"]
            y = y + scaling * (a @ A[e].t()) @ B[e].t()
        out = out.index_add(0, tok, y * weights[tok, j, None].to(y.dtype))
    return out
