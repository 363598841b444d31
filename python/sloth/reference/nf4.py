"""Plain-PyTorch NF4 and blockwise 8-bit quantization: the oracle of sloth's NF4 kernels.

Written for clarity. The arithmetic is fp32 in the order bitsandbytes uses, so results are bit-exact.
"""

from __future__ import annotations

import math

import torch

#: The 16 NF4 values (bitsandbytes' code for quant_type="nf4").
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)

MIN_ABSMAX = 1e-38  # all-zero blocks divide by this instead of 0


def _build_dynamic_code() -> torch.Tensor:
    # Signed dynamic map, 7 exponent bits: for exponent i the code holds +-10^(i-6) times the midpoints
    # of 2^i + 1 evenly spaced points in [0.1, 1], plus 0 and 1; sorted.
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


_DYNAMIC_CODE = _build_dynamic_code()  # built once at import: a constant under torch.compile


def dynamic_code(device="cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 sorted fp32 values), used for double quantization."""
    return _DYNAMIC_CODE.to(device)


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    # index of the nearest code value; a value exactly on a midpoint takes the lower one
    bounds = (code[:-1] + code[1:]) * 0.5
    return torch.bucketize(scaled, bounds.to(scaled.device)).to(torch.uint8)


def _blockwise_absmax_scale(x: torch.Tensor, blocksize: int):
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # [blocks, blocksize]
    absmax = blocks.abs().amax(dim=1)  # [blocks]
    scaled = blocks * (1.0 / absmax.clamp(min=MIN_ABSMAX))[:, None]
    return scaled.reshape(-1)[:n], absmax


def blockwise8_quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """(q uint8 shaped like x, absmax fp32 [blocks]): nearest code entry to x / absmax of its block."""
    scaled, absmax = _blockwise_absmax_scale(x, blocksize)
    return _nearest(scaled, code).reshape(x.shape), absmax


def blockwise8_dequantize(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """fp32 code[q] * absmax[block], flattened."""
    idx = torch.arange(q.numel(), device=q.device) // blocksize
    return code.to(q.device)[q.reshape(-1).long()] * absmax[idx]


def nf4_quantize(x: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True) -> dict:
    """Reference NF4 quantization; returns packed [(n+1)//2, 1] uint8 and the state as a dict."""
    scaled, absmax = _blockwise_absmax_scale(x, blocksize)
    q = _nearest(scaled, NF4_CODE)
    if q.numel() % 2:
        q = torch.cat([q, _nearest(torch.zeros(1, device=q.device), NF4_CODE)])
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)  # element 2j in the high nibble
    state = {"absmax": absmax, "shape": x.shape, "blocksize": blocksize, "dtype": x.dtype}
    if compress_statistics:
        offset = absmax.mean()
        code2 = dynamic_code(x.device)
        qa, absmax2 = blockwise8_quantize(absmax - offset, code2, 256)
        state.update(absmax=qa, offset=offset, code2=code2, absmax2=absmax2, blocksize2=256)
    return {"packed": packed, **state}


def nf4_dequantize(packed, absmax, shape, blocksize, dtype, code2=None, absmax2=None, offset=None,
                   blocksize2=256) -> torch.Tensor:
    """Reference NF4 dequantization: fp32 NF4[q] * absmax[block], rounded once to dtype."""
    n = math.prod(shape)
    if absmax.dtype == torch.uint8:
        absmax = blockwise8_dequantize(absmax, absmax2, code2, blocksize2) + offset
    p = packed.reshape(-1).view(torch.uint8)
    q = torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)[:n].long()
    values = NF4_CODE.to(p.device)[q] * absmax[torch.arange(n, device=p.device) // blocksize]
    return values.to(dtype).reshape(shape)
