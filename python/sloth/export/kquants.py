"""llama.cpp's k-quants Q4_K, Q5_K and Q6_K, quantized by sloth (the ``gguf`` package reads them but has no
quantizer for them), on the CPU or on the GPU the weights are on (plain PyTorch, vectorized over blocks).

The algorithm is llama.cpp's reference quantizer (``quantize_row_q{4,5,6}_K_ref``), re-derived from its published
description: super-blocks of 256 values along a row.

- Q4_K / Q5_K: eight sub-blocks of 32 values, each ``x ~ d_j * q - m_j`` with ``q`` in [0, 15] / [0, 31]. Each
  sub-block's (scale, min) is found by a weighted least-squares search (weights ``sqrt(mean(x^2)) + |x|``): start
  from the min-max grid, then try ``nstep`` grid sizes ``nmax + rmin + rdelta * i`` (each anchored at the best min
  found so far) and keep the one whose closed-form least-squares (scale, min) has the smallest weighted error (min
  clamped to <= 0). The eight scales
  and mins are then quantized to 6 bits against the super-block's fp16 ``d`` / ``dmin`` and the values requantized
  with the rounded scales. Bytes: d, dmin (fp16), 12 bytes of packed 6-bit scales / mins, (Q5_K: 32 bytes of
  high bits), 128 bytes of low nibbles. 144 / 176 bytes per 256 values.
- Q6_K: sixteen sub-blocks of 16 values, ``x ~ d * s_j * q`` with ``q`` in [-32, 31]; each sub-block's scale is
  the best of 19 grid sizes ``-(32 + 0.1 i) / max`` (i = -9..9) by ``x^2``-weighted least squares, the sixteen
  scales quantized to int8 against the fp16 ``d``. Bytes: 128 low nibbles, 64 bytes of 2-bit highs, 16 int8
  scales, d. 210 bytes per 256 values.

Rounding is round-half-to-even (llama.cpp's ``nearest_int``), fp16 conversions round to nearest even, all
arithmetic in fp32. Memory: a few fp32 copies of the tensor being quantized (callers pass one tensor at a time).
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}


def _rint(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # half to even, as nearest_int


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 bytes of ``x [n]``: uint8 ``[n, 2]``."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per row of ``x [n, 32]`` (weights ``w``): (scale [n], -min [n], q [n, 32] in [0, nmax]) minimizing the
    weighted error of ``scale * q + min`` over llama.cpp's grid search (``make_qkx2_quants``). Products are fp32 as
    in llama.cpp; the sums are accumulated in fp64: the least-squares determinant ``sum_w * sum_l2 - sum_l^2``
    cancels badly in fp32, where the chosen grid point then depends on the order of the additions."""
    f64 = torch.float64
    mn = torch.clamp(x.min(dim=1).values, max=0.0)  # [n]
    mx = x.max(dim=1).values
    sum_w = w.sum(dim=1, dtype=f64)
    sum_x = (w * x).sum(dim=1, dtype=f64)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = nmax / rng
    scale = 1.0 / iscale
    q = torch.clamp(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * q + mn[:, None] - x
    best = (w * (diff * diff)).sum(dim=1, dtype=f64)
    cur_min = mn.clone()
    scale = scale.clone()
    for i in range(nstep + 1):  # the grid follows the best min found so far (llama.cpp updates it in the loop)
        num = float(np.float32(np.float32(rmin) + np.float32(rdelta) * np.float32(i)) + np.float32(nmax))  # fp32
        isc = num / torch.where(flat, torch.ones_like(mx), mx - cur_min)
        la = torch.clamp(_rint(isc[:, None] * (x - cur_min[:, None])), 0, nmax)
        wl = w * la
        sum_l = wl.sum(dim=1, dtype=f64)
        sum_l2 = (wl * la).sum(dim=1, dtype=f64)
        sum_xl = (wl * x).sum(dim=1, dtype=f64)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det_s = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det_s
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det_s
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min).float()  # llama.cpp keeps them fp32
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)),
                                 this_scale).float()
        diff = this_scale[:, None] * la + this_min[:, None] - x
        err = (w * (diff * diff)).sum(dim=1, dtype=f64)
        better = ok & (err < best) & ~flat
        q = torch.where(better[:, None], la, q)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        cur_min = torch.where(better, this_min, cur_min)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    q = torch.where(flat[:, None], torch.zeros_like(q), q)
    return scale, -cur_min, q


def _q45_k(x: torch.Tensor, bits: int):
    """(d, dmin, packed scales [nb, 12], L [nb, 256]) of Q4_K (bits 4) / Q5_K (bits 5) for ``x [nb, 256]``."""
    nb = x.shape[0]
    nmax = (1 << bits) - 1
    rmin, nstep = (-1.0, 20) if bits == 4 else (-0.5, 15)
    sub = x.reshape(nb * 8, 32)
    av = torch.sqrt((sub * sub).sum(dim=1) / 32)
    w = av[:, None] + sub.abs()
    scales, mins, q = make_qkx2(sub, w, nmax, rmin, 0.1, nstep)
    scales, mins, q = scales.reshape(nb, 8), mins.reshape(nb, 8), q.reshape(nb, 8, 32)
    max_scale = scales.max(dim=1).values  # [nb] (scales are >= 0)
    max_min = mins.max(dim=1).values
    inv_s = torch.where(max_scale > 0, 63.0 / torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale)),
                        torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, 63.0 / torch.where(max_min > 0, max_min, torch.ones_like(max_min)),
                        torch.zeros_like(max_min))
    ls = torch.clamp(_rint(inv_s[:, None] * scales), max=63).to(torch.int32)  # [nb, 8]
    lm = torch.clamp(_rint(inv_m[:, None] * mins), max=63).to(torch.int32)
    d = _fp16_round(max_scale / 63.0)
    dmin = _fp16_round(max_min / 63.0)
    packed = torch.empty(nb, 12, dtype=torch.int32, device=x.device)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    dj = d[:, None] * ls.to(torch.float32)  # [nb, 8]
    dmj = dmin[:, None] * lm.to(torch.float32)
    nz = dj != 0
    dj_s = torch.where(nz, dj, torch.ones_like(dj))
    requant = torch.clamp(_rint((x.reshape(nb, 8, 32) + dmj[:, :, None]) / dj_s[:, :, None]), 0, nmax)
    q = torch.where(nz[:, :, None], requant, q).to(torch.int32).reshape(nb, 256)
    return d, dmin, packed.to(torch.uint8), q


#: super-blocks quantized at once (16 MiB of fp32 values): keeps the CPU working set in cache
CHUNK_BLOCKS = 16384


def _chunked(fn, blocks: torch.Tensor) -> torch.Tensor:
    """``fn`` over ``blocks [nb, 256]`` in chunks of :data:`CHUNK_BLOCKS`, the byte rows concatenated."""
    if blocks.shape[0] <= CHUNK_BLOCKS:
        return fn(blocks)
    return torch.cat([fn(c) for c in blocks.split(CHUNK_BLOCKS)], dim=0)


def quantize_q4_k(x: torch.Tensor) -> np.ndarray:
    """Q4_K bytes of ``x [..., K]`` (K a multiple of 256): uint8 ``[..., K // 256 * 144]``."""
    lead, k = _check(x)
    out = _chunked(_q4_k_blocks, x.detach().to(torch.float32).reshape(-1, QK_K))
    return out.cpu().numpy().reshape(*lead, k // QK_K * BYTES["q4_k"])


def _q4_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K bytes ``[nb, 144]`` of ``blocks [nb, 256]``."""
    d, dmin, sc, q = _q45_k(blocks, 4)
    nb = blocks.shape[0]
    q = q.reshape(nb, 4, 2, 32)  # 64-value chunks: low nibble = first 32, high = next 32
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(nb, 128).to(torch.uint8)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), sc, qs], dim=1)  # [nb, 144]


def quantize_q5_k(x: torch.Tensor) -> np.ndarray:
    """Q5_K bytes of ``x [..., K]`` (K a multiple of 256): uint8 ``[..., K // 256 * 176]``."""
    lead, k = _check(x)
    out = _chunked(_q5_k_blocks, x.detach().to(torch.float32).reshape(-1, QK_K))
    return out.cpu().numpy().reshape(*lead, k // QK_K * BYTES["q5_k"])


def _q5_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K bytes ``[nb, 176]`` of ``blocks [nb, 256]``."""
    d, dmin, sc, q = _q45_k(blocks, 5)
    nb = blocks.shape[0]
    q = q.reshape(nb, 4, 2, 32)  # chunk c of 64 values: first half uses qh bit 2c, second half bit 2c + 1
    lo, hi = q & 0xF, q >> 4
    qs = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(nb, 128)
    shifts = torch.arange(8, device=blocks.device, dtype=torch.int32).reshape(1, 4, 2, 1)
    qh = (hi << shifts).sum(dim=(1, 2))  # [nb, 32] (disjoint bits)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), sc, qh.to(torch.uint8), qs.to(torch.uint8)], dim=1)


def make_qx(x: torch.Tensor, nmax: int):
    """Per row of ``x [n, 16]``: (scale [n], q + nmax [n, 16]) of llama.cpp's ``make_qx_quants`` with
    ``x^2`` weights (q in [-nmax, nmax - 1])."""
    ax = x.abs()
    idx = ax.argmax(dim=1, keepdim=True)  # first of the largest
    amax = ax.gather(1, idx).squeeze(1)
    mx = x.gather(1, idx).squeeze(1)
    zero = amax < 1e-15
    mx_s = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x

    def grid(iscale):
        lq = torch.clamp(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        return lq, (w * x * lq).sum(dim=1), (w * lq * lq).sum(dim=1)

    lq, sumlx, suml2 = grid(-nmax / mx_s)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    best = scale * sumlx
    q = lq
    for i in range(-9, 10):
        if i == 0:
            continue
        lq, sumlx, suml2 = grid(-(nmax + np.float32(0.1) * np.float32(i)) / mx_s)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        s = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        q = torch.where(better[:, None], lq, q)
        scale = torch.where(better, s, scale)
        best = torch.where(better, s * sumlx, best)
    q = torch.where(zero[:, None], torch.zeros_like(q), q + nmax)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, q


def quantize_q6_k(x: torch.Tensor) -> np.ndarray:
    """Q6_K bytes of ``x [..., K]`` (K a multiple of 256): uint8 ``[..., K // 256 * 210]``."""
    lead, k = _check(x)
    out = _chunked(_q6_k_blocks, x.detach().to(torch.float32).reshape(-1, QK_K))
    return out.cpu().numpy().reshape(*lead, k // QK_K * BYTES["q6_k"])


def _q6_k_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K bytes ``[nb, 210]`` of ``blocks [nb, 256]``."""
    nb = blocks.shape[0]
    scales, q = make_qx(blocks.reshape(nb * 16, 16), 32)
    scales, q = scales.reshape(nb, 16), q.reshape(nb, 16, 16)
    idx = scales.abs().argmax(dim=1, keepdim=True)
    max_abs = scales.abs().gather(1, idx).squeeze(1)
    max_scale = scales.gather(1, idx).squeeze(1)
    empty = max_abs < 1e-15
    iscale = -128.0 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d = _fp16_round(1.0 / iscale)
    sq = torch.clamp(_rint(iscale[:, None] * scales), max=127).to(torch.int32)  # [nb, 16]
    dj = d[:, None] * sq.to(torch.float32)
    nz = dj != 0
    requant = torch.clamp(_rint(blocks.reshape(nb, 16, 16) / torch.where(nz, dj, torch.ones_like(dj))[:, :, None]),
                          -32, 31) + 32
    L = torch.where(nz[:, :, None], requant, q).to(torch.int32).reshape(nb, 2, 4, 32)  # [nb, half, quarter, 32]
    L = torch.where(empty[:, None, None, None], torch.zeros_like(L), L)
    lo, hi = L & 0xF, L >> 4
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2)  # [nb, 2, 64]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [nb, 2, 32]
    sq = torch.where(empty[:, None], torch.zeros_like(sq), sq)
    d = torch.where(empty, torch.zeros_like(d), d)
    return torch.cat([ql.reshape(nb, 128).to(torch.uint8), qh.reshape(nb, 64).to(torch.uint8),
                      sq.to(torch.int8).view(torch.uint8), _fp16_bytes(d)], dim=1)  # [nb, 210]


def _check(x: torch.Tensor):
    if x.dim() < 1 or x.shape[-1] % QK_K:
        raise ValueError(f"sloth k-quants: the last dimension must be a multiple of {QK_K}, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("sloth k-quants: the tensor has NaN or infinite values")
    return tuple(x.shape[:-1]), x.shape[-1]


QUANTIZERS = {"q4_k": quantize_q4_k, "q5_k": quantize_q5_k, "q6_k": quantize_q6_k}

__all__ = ["BYTES", "QK_K", "QUANTIZERS", "make_qkx2", "make_qx", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k"]
