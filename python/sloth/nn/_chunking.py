"""How many rows of logits the chunked linear cross-entropy keeps alive at a time."""

from __future__ import annotations

from typing import Optional

import torch

MIB = 1 << 20
#: Logits chunk when only dh is needed: small, so that the extra memory is ~dh + 32 MiB.
FROZEN_TARGET_BYTES = 32 * MIB
#: Logits chunk when dW is needed too: dW += grad_c^T h_c reads and writes all of dW [V, H] once per chunk,
#: so a few large chunks beat many small ones (dW itself already costs V * H * itemsize bytes).
TRAINABLE_TARGET_BYTES = 256 * MIB
#: Row counts are rounded down to a multiple of this (cuBLAS tile height) when the chunk is at least this big.
ROW_MULTIPLE = 128


def chunk_rows(n: int, v: int, dtype: torch.dtype, device: torch.device, *, need_dw: bool = False,
               chunk_size: Optional[int] = None) -> int:
    """Rows per chunk for ``n`` rows of ``v`` logits of ``dtype``: ``chunk_size`` when given, else the largest
    row count whose logits fit the target (32 MiB, 256 MiB when dW is computed), at most a quarter of the free
    device memory, rounded down to a multiple of 128 rows; always in ``[1, max(n, 1)]``."""
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"sloth: chunk_size must be a positive number of rows, got {chunk_size}")
        return max(1, min(int(chunk_size), max(n, 1)))
    row_bytes = max(1, v * torch.empty((), dtype=dtype).element_size())
    target = TRAINABLE_TARGET_BYTES if need_dw else FROZEN_TARGET_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        target = min(target, max(free // 4, row_bytes))
    rows = max(1, target // row_bytes)
    if rows >= ROW_MULTIPLE:
        rows -= rows % ROW_MULTIPLE
    return max(1, min(rows, max(n, 1)))


#: Split-K factor for the dh GEMM; None chooses from the GPU's multiprocessor count (see dh_matmul).
DH_SPLIT_K: Optional[int] = None


def _split_k(rows: int, h: int, v: int, device: torch.device) -> int:
    if DH_SPLIT_K is not None:
        return DH_SPLIT_K
    if device.type != "cuda":
        return 1
    tiles = -(-rows // 128) * -(-h // 128)  # output tiles of a 128 x 128 GEMM kernel
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    split = 1
    while tiles * split < 2 * sms and v // (split * 2) >= 2048 and split < 16:
        split *= 2
    return split


def dh_matmul(grad: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out [rows, H] = grad [rows, V] @ weight [V, H].

    With small chunks this GEMM has few output tiles (128 x 4096 is 32 tiles of 128 x 128 on 132 SMs) and a
    long K = V, which cuBLAS runs on a fraction of the GPU. Splitting K into `split` slices (one batched GEMM,
    [split, rows, H] partials summed in fp32) fills the GPU at the cost of split * rows * H * 2 bytes.
    """
    rows, v = grad.shape
    split = _split_k(rows, weight.shape[1], v, grad.device)
    if split <= 1:
        torch.mm(grad, weight, out=out)
        return
    vs = v // split
    main = vs * split
    parts = torch.bmm(grad[:, :main].unflatten(1, (split, vs)).transpose(0, 1),  # [split, rows, vs]
                      weight[:main].view(split, vs, -1))  # [split, vs, H] -> [split, rows, H]
    acc = parts.sum(0, dtype=torch.float32)  # [rows, H]
    if main < v:
        acc.addmm_(grad[:, main:].float(), weight[main:].float())
    out.copy_(acc)
