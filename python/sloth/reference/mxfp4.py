"""Plain-PyTorch MXFP4 (OCP MX E2M1 values, E8M0 scale per 32): the oracle of sloth's MXFP4 kernels."""

from __future__ import annotations

import torch

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """2^(s - 127) in fp32 (s = 255 overflows to inf; dequantization uses ldexp instead)."""
    return torch.pow(2.0, scales.to(torch.int32) - 127).float()


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16], scales [..., G] -> [..., G * 32]; element 2j is the LOW nibble."""
    lo = (blocks & 0x0F).long()
    hi = (blocks >> 4).long()
    idx = torch.stack([lo, hi], dim=-1).flatten(-2)  # [..., G, 32]
    # exact v * 2^(s - 127), as Transformers' torch.ldexp; s = 255 is the E8M0 NaN (OCP MX)
    values = torch.ldexp(E2M1_VALUES.to(blocks.device)[idx], scales.to(torch.int32)[..., None] - 127)
    return values.to(dtype).masked_fill(scales[..., None] == 255, float("nan")).flatten(-2)


def _e2m1_nearest(x: torch.Tensor) -> torch.Tensor:
    # round |x| to the nearest E2M1 magnitude, ties to the even mantissa, saturating at 6
    mags = E2M1_VALUES[:8].to(x.device)
    a = x.abs().clamp(max=6.0)
    d = (a[..., None] - mags).abs()  # [..., 8]
    best = d.min(dim=-1, keepdim=True).values
    tie_ok = (d == best)
    # among tied candidates prefer an even code (mantissa bit 0)
    even = (torch.arange(8, device=x.device) % 2 == 0)
    m = torch.where((tie_ok & even).any(-1), (tie_ok & even).float().argmax(-1), tie_ok.float().argmax(-1))
    m = torch.where(torch.isnan(x), torch.zeros_like(m), m)
    sign = (torch.signbit(x) & ~torch.isnan(x)).to(torch.long) * 8
    return (m + sign).to(torch.uint8)


def mxfp4_quantize(x: torch.Tensor):
    """x [..., K] -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8), OCP MX rounding."""
    g = x.shape[-1] // 32
    v = x.float().reshape(*x.shape[:-1], g, 32)
    amax = v.abs().amax(-1)  # [..., G]
    exp = torch.frexp(amax).exponent - 1  # floor(log2 amax) for normal amax
    biased = torch.where(amax >= 2.0**-126, exp + 127 - 2, torch.zeros_like(exp))
    biased = torch.where(torch.isfinite(amax), biased, torch.full_like(exp, 254)).clamp(0, 254)
    biased = torch.where(torch.isnan(amax), torch.full_like(exp, 255), biased)  # a NaN in the block: the NaN scale
    scales = biased.to(torch.uint8)
    q = _e2m1_nearest(v / e8m0_to_float(scales.clamp(max=254))[..., None])  # [..., G, 32]
    blocks = q[..., 0::2] | (q[..., 1::2] << 4)
    return blocks, scales
