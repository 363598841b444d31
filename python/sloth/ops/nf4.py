"""NF4 quantize / dequantize in bitsandbytes' layout (``torch.ops.sloth.nf4_*``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import FLOAT_DTYPES, check_device_supported, check_out_dtype, check_tensor

#: Blocksizes bitsandbytes accepts for 4-bit quantization.
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class NF4State:
    """How a packed NF4 tensor dequantizes; the same fields as bitsandbytes' ``QuantState``.

    ``absmax`` is fp32 ``[blocks]``, or uint8 ``[blocks]`` with ``state2`` (``absmax``: fp32
    ``[ceil(blocks / 256)]``, ``code``: fp32 ``[256]``, ``blocksize``) and ``offset`` (0-d fp32)
    when double-quantized (``nested``).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    offset: Optional[torch.Tensor] = None
    state2: Optional["NF4State"] = None
    code: Optional[torch.Tensor] = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def to_bitsandbytes(self):
        """The equivalent ``bitsandbytes.functional.QuantState`` (needs bitsandbytes)."""
        from bitsandbytes.functional import QuantState, get_4bit_type

        state2 = None
        if self.nested:
            state2 = QuantState(
                absmax=self.state2.absmax, code=self.state2.code, blocksize=self.state2.blocksize,
                dtype=torch.float32,
            )
        return QuantState(
            absmax=self.absmax, shape=self.shape, code=get_4bit_type("nf4", device=self.absmax.device),
            blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2,
        )


def _check_blocksize(blocksize: int, allowed=NF4_BLOCKSIZES) -> None:
    if blocksize not in allowed:
        raise ValueError(f"sloth: blocksize must be one of {allowed}, got {blocksize}")


def nf4_quantize(
    x: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True
) -> tuple[torch.Tensor, NF4State]:
    """Quantize ``x`` to NF4 exactly as ``bitsandbytes.functional.quantize_4bit(x, quant_type="nf4")``.

    Returns ``(packed, state)``: ``packed`` is uint8 ``[(numel + 1) // 2, 1]`` (element 2j in the high
    nibble), ``state`` an :class:`NF4State`; with ``compress_statistics`` the per-block absmax is itself
    quantized to 8 bits (blocks of 256, bitsandbytes' dynamic code, mean offset).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    _check_blocksize(blocksize)
    check_device_supported(x, "nf4_quantize")
    packed, absmax = torch.ops.sloth.nf4_quantize(x, blocksize)  # [(n+1)//2, 1] u8, [blocks] f32
    state = NF4State(absmax=absmax, shape=x.shape, dtype=x.dtype, blocksize=blocksize)
    if compress_statistics:
        from ..reference.nf4 import dynamic_code

        offset = absmax.mean()  # 0-d fp32, as bitsandbytes
        code2 = dynamic_code(absmax.device)
        qabsmax, absmax2 = torch.ops.sloth.blockwise8_quantize(absmax - offset, code2, 256)
        state.absmax, state.offset = qabsmax, offset
        state.state2 = NF4State(absmax=absmax2, shape=absmax.shape, dtype=torch.float32, blocksize=256, code=code2)
    return packed, state


def nf4_dequantize(
    packed: torch.Tensor,
    quant_state=None,
    *,
    absmax: Optional[torch.Tensor] = None,
    shape=None,
    blocksize: int = 64,
    dtype: Optional[torch.dtype] = None,
    code2: Optional[torch.Tensor] = None,
    absmax2: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """Dequantize packed NF4 data to a ``shape`` tensor of ``dtype``, bit-exact with bitsandbytes.

    ``dtype`` defaults to the quant_state's dtype (bfloat16 without one).
    Pass a bitsandbytes ``QuantState`` (or :class:`NF4State`) as it is, e.g. ``weight.quant_state`` of a
    ``Params4bit``, or the raw tensors: ``absmax`` fp32 ``[blocks]``, or uint8 ``[blocks]`` together with
    ``code2`` fp32 ``[256]``, ``absmax2`` fp32 ``[ceil(blocks / blocksize2)]`` and ``offset`` 0-d fp32.
    ``packed`` may be any storage dtype (bitsandbytes' ``quant_storage``); its bytes are read as uint8.
    Traffic: reads numel / 2 bytes (+ 1 per block), writes numel * itemsize(dtype) bytes.
    """
    if quant_state is not None:
        if getattr(quant_state, "quant_type", "nf4") != "nf4":
            raise ValueError(f"sloth: nf4_dequantize got a quant_state of type {quant_state.quant_type!r}; "
                             "only 'nf4' is supported")
        absmax, shape, blocksize = quant_state.absmax, quant_state.shape, quant_state.blocksize
        dtype = dtype or quant_state.dtype
        if quant_state.nested:
            code2, absmax2, blocksize2 = quant_state.state2.code, quant_state.state2.absmax, quant_state.state2.blocksize
            offset = quant_state.offset
    if absmax is None or shape is None:
        raise ValueError("sloth: nf4_dequantize needs a quant_state, or absmax= and shape=")
    dtype = dtype or torch.bfloat16
    check_tensor("packed", packed)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8) if packed.is_contiguous() else packed.contiguous().view(torch.uint8)
    check_tensor("absmax", absmax, dtypes=(torch.float32, torch.uint8), dim=1, device=packed.device)
    check_out_dtype(dtype)
    _check_blocksize(blocksize)
    shape = [int(s) for s in shape]
    numel = math.prod(shape)
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"sloth: packed holds {packed.numel()} bytes but shape {tuple(shape)} needs "
                         f"{(numel + 1) // 2}; pass the shape the tensor was quantized with")
    if absmax.numel() != -(-numel // blocksize):
        raise ValueError(f"sloth: absmax has {absmax.numel()} entries, expected ceil({numel} / {blocksize}) = "
                         f"{-(-numel // blocksize)}; is blocksize right?")
    if absmax.dtype == torch.uint8:
        if code2 is None or absmax2 is None or offset is None:
            raise ValueError("sloth: uint8 absmax is double-quantized and needs code2, absmax2 and offset")
        check_tensor("code2", code2, dtypes=(torch.float32,), device=packed.device)
        check_tensor("absmax2", absmax2, dtypes=(torch.float32,), dim=1, device=packed.device)
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
        check_tensor("offset", offset, dtypes=(torch.float32,), device=packed.device)
        if code2.numel() != 256 or offset.numel() != 1:
            raise ValueError("sloth: code2 must have 256 entries and offset 1")
        _check_blocksize(blocksize2, (32, 64, 128, 256, 512, 1024, 2048, 4096))
        if absmax2.numel() != -(-absmax.numel() // blocksize2):
            raise ValueError(f"sloth: absmax2 has {absmax2.numel()} entries, expected "
                             f"ceil({absmax.numel()} / {blocksize2})")
        if offset.dim():
            offset = offset.reshape(())
    else:
        code2 = absmax2 = offset = None
    check_device_supported(packed, "nf4_dequantize")
    return torch.ops.sloth.nf4_dequantize(packed, absmax, shape, blocksize, dtype, code2, absmax2, offset,
                                          blocksize2)


@torch.library.register_fake("sloth::nf4_quantize")
def _(x, blocksize):
    n = x.numel()
    return (x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            x.new_empty((-(-n // blocksize),), dtype=torch.float32))


@torch.library.register_fake("sloth::nf4_dequantize")
def _(packed, absmax, shape, blocksize, dtype, code2=None, absmax2=None, offset=None, blocksize2=256):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("sloth::blockwise8_quantize")
def _(x, code, blocksize):
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((-(-x.numel() // blocksize),), dtype=torch.float32)
