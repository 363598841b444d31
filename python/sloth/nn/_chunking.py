"""How many rows of logits the chunked linear cross-entropy keeps alive at a time."""

from __future__ import annotations

import math

from typing import Optional

import torch

MIB = 1 << 20
#: Logits chunk when only dh is needed: the dh GEMM (M = rows, K = V) needs >= 256 rows to fill the GPU, and more
#: rows only add memory (benchmarks/NOTES.md). 64 MiB is 256 rows at V = 128k.
FROZEN_TARGET_BYTES = 64 * MIB
#: Logits chunk when dW is needed too: dW += grad_c^T h_c reads and writes all of dW [V, H] once per chunk,
#: so a few large chunks beat many small ones (dW itself already costs V * H * itemsize bytes).
TRAINABLE_TARGET_BYTES = 256 * MIB
#: Row counts are rounded down to a multiple of this (cuBLAS tile height) when the chunk is at least this big.
ROW_MULTIPLE = 128
#: Rows per chunk of the online path (frozen W, dh only: see _online_head), whose memory is rows x (H fp32 +
#: a vocabulary block): 1024 rows keep both block GEMMs at tensor-core speed (M = 1024) for 16 + 16 MiB at
#: H = 4096 in bf16.
ONLINE_ROWS = 1024
#: Vocabulary columns per block of the online path (its block GEMMs are [rows, H] x [H, VOCAB_BLOCK] and
#: [rows, V_b] x [V_b, H]): the fastest of 2048 / 4096 / 8192 on an H200 (benchmarks/NOTES.md).
VOCAB_BLOCK = 8192
#: Fewest rows per chunk on a GPU, whatever the vocabulary (V = 262144 with 64 MiB would give 128 rows,
#: which runs the GEMMs at a third of their speed), unless free memory says otherwise.
MIN_GPU_ROWS = 256


def chunk_rows(n: int, v: int, dtype: torch.dtype, device: torch.device, *, need_dw: bool = False,
               chunk_size: Optional[int] = None, online_hidden: Optional[int] = None) -> int:
    """Rows per chunk for ``n`` rows of ``v`` logits of ``dtype``: ``chunk_size`` when given; for the online
    path (``online_hidden`` = H given) 1024 rows; else the largest row count whose logits fit the target
    (64 MiB, 256 MiB when dW is computed) but at least 256 rows on a GPU. Then at most a quarter of the free
    device memory, rounded down to a multiple of 128 rows; always in ``[1, max(n, 1)]``."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"sloth: chunk_size must be a positive number of rows, got {chunk_size}")
        return max(1, min(int(chunk_size), max(n, 1)))
    itemsize = dtype.itemsize
    if online_hidden is not None:
        row_bytes = online_hidden * 4 + min(v, VOCAB_BLOCK) * itemsize
        rows = ONLINE_ROWS
    else:
        row_bytes = max(1, v * itemsize)
        rows = max(1, (TRAINABLE_TARGET_BYTES if need_dw else FROZEN_TARGET_BYTES) // row_bytes)
    if device.type == "cuda":
        if online_hidden is None:
            rows = max(rows, MIN_GPU_ROWS)
        if not torch.compiler.is_compiling():  # (a host query Dynamo cannot trace: compiled, the targets alone)
            free, _ = torch.cuda.mem_get_info(device)
            rows = min(rows, max(1, free // 4 // row_bytes))
    if rows >= ROW_MULTIPLE:
        rows -= rows % ROW_MULTIPLE
    return max(1, min(rows, max(n, 1)))



def prepare_head_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor,
                        chunk_size: Optional[int], *, online: bool = False):
    """Flatten ``hidden [..., H]`` / ``targets [...]`` for a chunked linear head, and decide what to compute.

    Returns ``(h2 [tokens, H] contiguous, targets [tokens] int64, needs, chunk)``: ``needs`` = whether dh, dW,
    db are wanted (grad mode on and the tensor requires grad), ``chunk`` = rows per chunk (see chunk_rows; the
    online path's when ``online`` and only dh is wanted).
    """
    h2 = hidden.reshape(math.prod(hidden.shape[:-1]), hidden.shape[-1])  # [tokens, hidden] (hidden may be 0)
    if not h2.is_contiguous():
        h2 = h2.contiguous()
    t = targets.reshape(-1).to(torch.int64)  # [tokens]
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    chunk = online_rows(h2, weight, needs, chunk_size) if online else None
    if chunk is None:
        chunk = chunk_rows(h2.shape[0], weight.shape[0], h2.dtype, h2.device, need_dw=needs[1],
                           chunk_size=chunk_size)
    return h2, t, needs, chunk


def online_rows(h2: torch.Tensor, weight: torch.Tensor, needs, chunk_size: Optional[int]) -> Optional[int]:
    """Rows per chunk of the online frozen-head path (_online_head; see chunk_rows) for ``h2 [tokens, H]`` when
    only dh is wanted (``needs == (True, False, False)``), else None."""
    if needs != (True, False, False):
        return None
    return chunk_rows(h2.shape[0], weight.shape[0], h2.dtype, h2.device, chunk_size=chunk_size,
                      online_hidden=h2.shape[1])


def chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor, bias, out: torch.Tensor) -> torch.Tensor:
    """out [c, vocab] = hidden_c [c, hidden] @ weight^T (+ bias), in the input dtype (one cuBLAS GEMM)."""
    if bias is None:
        return torch.mm(hidden_c, weight.t(), out=out)
    return torch.addmm(bias, hidden_c, weight.t(), out=out)


def fold_chunk_grads(grad_c: torch.Tensor, hidden_c: torch.Tensor, weight: torch.Tensor, dh_c, dw, db) -> None:
    """Fold d loss / d logits of one chunk, grad_c [c, vocab], into dh_c [c, hidden] (written), dW [vocab, hidden]
    and db [vocab] fp32 (accumulated); each may be None when not wanted."""
    if dh_c is not None:
        torch.mm(grad_c, weight, out=dh_c)
    if dw is not None:
        dw.addmm_(grad_c.t(), hidden_c)
    if db is not None:
        db.add_(grad_c.sum(0, dtype=torch.float32))
