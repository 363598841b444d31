"""Loss and dh of a frozen linear head with only a ``[rows, vocab_block]`` block of logits alive (W frozen).

For each row chunk, the vocabulary is walked in blocks: one GEMM makes the block's logits, a sloth kernel turns
them in place into ``p' = exp(z - m) dz/dx`` against a running max m (online softmax, fp32 state per row), and a
second GEMM adds ``p' @ W_block`` into an fp32 accumulator ``acc [rows, H]``. After the last block,
``dh = acc / sum exp(z - m) - dz/dx_label W_label``: the same two GEMMs as the materialized chunked loss
(2 x 2 N V H FLOP), but with ~1024-row GEMMs that run at tensor-core speed instead of 256-row GEMMs that stream
W from memory, and far less memory (a 1024 x 8192 block, 16 MiB in bf16, and a 16 MiB accumulator at H = 4096).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._chunking import VOCAB_BLOCK, chunk_logits

#: How far a block's max may exceed the reference max before it moves (p' <= e^margin): 8 for bf16 / fp32 (whose
#: range reaches 3e38; most rows then need no acc rescale after their first block), 0 for fp16 (range ends at 65504).
MARGIN = {torch.float32: 8.0, torch.bfloat16: 8.0, torch.float16: 0.0}
#: torch >= 2.8 has 16-bit x 16-bit -> fp32 GEMMs on CUDA (mm / addmm with out_dtype); older torch takes fp32
#: copies of the operands (exact, slower).
_FP32_OUT_GEMM = hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")


def _accumulate(acc: torch.Tensor, p: torch.Tensor, w_b: torch.Tensor, first: bool) -> None:
    """acc [rows, H] fp32 (first: =, else +=) p [rows, vb] @ w_b [vb, H], accumulated in fp32 by the GEMM."""
    if p.dtype == torch.float32:
        torch.addmm(acc, p, w_b, beta=0.0 if first else 1.0, out=acc)
    elif acc.device.type == "cuda" and _FP32_OUT_GEMM:  # cuBLAS: 16-bit operands, fp32 C read and written in place
        if first:
            torch.mm(p, w_b, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, p, w_b, out_dtype=torch.float32, out=acc)
    else:  # no 16-bit x 16-bit -> fp32 GEMM here (CPU, older torch): fp32 copies of the operands (exact)
        torch.addmm(acc, p.float(), w_b.float(), beta=0.0 if first else 1.0, out=acc)


def online_head_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float,
    logit_scale: float,
    rows: int,
    *,
    row_scale: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [tokens] fp32, dh [tokens, hidden]) of ``sum_rows c_row * (lse(z) - z[label])`` with ``z`` the
    (scaled, softcapped) logits of ``hidden [tokens, H] @ weight [V, H]^T (+ bias)``, ``c = row_scale [tokens]``
    (1 when None; 0 on ``ignore_index`` rows, whose loss is 0; NaN loss for labels outside [0, V)). Inputs are
    validated by the caller: contiguous hidden, int64 labels, weight / bias of hidden's dtype and device."""
    n, h = hidden.shape
    v = weight.shape[0]
    loss = hidden.new_empty((n,), dtype=torch.float32)  # [tokens]
    dh = torch.empty_like(hidden)  # [tokens, hidden]
    if n == 0:
        return loss, dh
    r = max(1, min(rows, n))
    vb = max(1, min(VOCAB_BLOCK, v))
    margin = MARGIN[hidden.dtype]
    buf = hidden.new_empty((r * vb,))  # one [rows, vb] block of logits, then of p'
    state = hidden.new_empty((r, 4), dtype=torch.float32)  # [rows, (m, s, z_label, dz/dx_label)]
    acc = hidden.new_empty((r, h), dtype=torch.float32)  # [rows, hidden]
    for s in range(0, n, r):
        e = min(n, s + r)
        c = e - s
        h_c, lab_c, st, ac = hidden[s:e], labels[s:e], state[:c], acc[:c]
        for v0 in range(0, v, vb):
            v1 = min(v, v0 + vb)
            w_b = weight[v0:v1]  # [vb, hidden]
            blk = chunk_logits(h_c, w_b, None if bias is None else bias[v0:v1], buf[: c * (v1 - v0)].view(c, v1 - v0))
            torch.ops.sloth.ce_online_block(blk, lab_c, v0, st, ac, softcap, logit_scale, margin)
            _accumulate(ac, blk, w_b, v0 == 0)
        loss[s:e] = torch.ops.sloth.ce_online_finish(
            st, ac, weight, lab_c, None if row_scale is None else row_scale[s:e], ignore_index, dh[s:e])
    return loss, dh
