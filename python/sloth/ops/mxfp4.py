"""MXFP4 quantize / dequantize in the gpt-oss / Transformers layout (``torch.ops.sloth.mxfp4_*``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import FLOAT_DTYPES, check_device_supported, check_out_dtype, check_tensor

MX_BLOCK = 32  # elements per E8M0 scale


@dataclass(frozen=True)
class MXFP4State:
    """Describes an MXFP4 weight for :func:`sloth.lora_linear`: the weight passed is its ``blocks`` (uint8
    ``[out, in / 32, 16]``) and this holds their ``scales`` (uint8 ``[out, in / 32]``, E8M0), as returned by
    :func:`mxfp4_quantize` of an ``[out, in]`` weight."""

    scales: torch.Tensor


def mxfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., K]`` (K a multiple of 32) to MXFP4.

    Returns ``(blocks, scales)``: ``blocks`` uint8 ``[..., K / 32, 16]`` (element 2j in the LOW nibble),
    ``scales`` uint8 ``[..., K / 32]`` (E8M0, 2^(s - 127)). Each block's scale is 2^(floor(log2 amax) - 2)
    and elements round to nearest E2M1 (ties to even), saturating at +-6 (the OCP MX rule).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] % MX_BLOCK != 0:
        raise ValueError(f"sloth: mxfp4_quantize needs a last dimension that is a multiple of 32, got shape "
                         f"{tuple(x.shape)}; pad it first")
    check_device_supported(x, "mxfp4_quantize")
    return torch.ops.sloth.mxfp4_quantize(x)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize MXFP4 ``blocks [..., G, 16]`` / ``scales [..., G]`` to ``[..., G * 32]`` of ``dtype``.

    Bit-exact with Transformers' ``convert_moe_packed_tensors``, which returns the same values with the
    last two dimensions of a 4-d expert tensor transposed (``out.transpose(1, 2)``).
    Traffic: reads 17 bytes per 32 elements, writes 32 * itemsize(dtype).
    """
    check_tensor("blocks", blocks, dtypes=(torch.uint8,))
    check_tensor("scales", scales, dtypes=(torch.uint8,), device=blocks.device)
    check_out_dtype(dtype)
    if blocks.dim() < 2 or blocks.shape[-1] != MX_BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"sloth: mxfp4 blocks must be [..., G, 16] with scales [..., G]; got blocks "
                         f"{tuple(blocks.shape)} and scales {tuple(scales.shape)}")
    check_device_supported(blocks, "mxfp4_dequantize")
    return torch.ops.sloth.mxfp4_dequantize(blocks, scales, dtype)


@torch.library.register_fake("sloth::mxfp4_quantize")
def _(x):
    g = x.shape[-1] // MX_BLOCK
    return (x.new_empty((*x.shape[:-1], g, MX_BLOCK // 2), dtype=torch.uint8),
            x.new_empty((*x.shape[:-1], g), dtype=torch.uint8))


@torch.library.register_fake("sloth::mxfp4_dequantize")
def _(blocks, scales, dtype):
    return blocks.new_empty((*blocks.shape[:-2], blocks.shape[-2] * MX_BLOCK), dtype=dtype)
