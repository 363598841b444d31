"""QLoRA linear ops: NF4 dequantize into a workspace, and the small-M fused NF4 GEMV + LoRA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._checks import FLOAT_DTYPES, check_device_supported, check_tensor

#: Largest number of rows (tokens) the fused GEMV takes; above it the dequantize + GEMM path runs.
GEMV_MAX_M = 16


@dataclass
class NF4Args:
    """The flat arguments of the NF4 ops, read from a bitsandbytes ``QuantState`` or a sloth ``NF4State``."""

    packed: torch.Tensor  # uint8 [(numel + 1) // 2]
    absmax: torch.Tensor
    shape: tuple
    blocksize: int
    dtype: torch.dtype
    code2: Optional[torch.Tensor] = None
    absmax2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    blocksize2: int = 256

    @classmethod
    def from_state(cls, packed: torch.Tensor, quant_state) -> "NF4Args":
        """The checked arguments of ``packed`` / ``quant_state``, made once per pair: kept on the quant state
        (``_sloth_args``) while the packed bytes and absmax stay where they are (a training step asks for them
        about 20 times per layer; building them costs some ten tensor operations)."""
        absmax = getattr(quant_state, "absmax", None)
        key = (packed.data_ptr(), absmax.data_ptr() if isinstance(absmax, torch.Tensor) else None, packed.device)
        hit = getattr(quant_state, "_sloth_args", None)
        if hit is not None and hit[0] == key:
            return hit[1]
        args = cls._build(packed, quant_state)
        try:
            quant_state._sloth_args = (key, args)
        except AttributeError:  # a quant state that takes no attributes: build each time
            pass
        return args

    @classmethod
    def _build(cls, packed: torch.Tensor, quant_state) -> "NF4Args":
        if getattr(quant_state, "quant_type", "nf4") != "nf4":
            raise ValueError(f"sloth: only NF4 weights are supported, got quant_type {quant_state.quant_type!r}")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("sloth: this bitsandbytes weight was repacked for bitsandbytes' CPU kernels "
                             "(quant_state.packing_format_for_cpu); undo it with "
                             "bitsandbytes.functional._convert_weight_packed_for_cpu_inverse first")
        packed = packed.data if isinstance(packed, torch.nn.Parameter) else packed
        packed = packed.as_subclass(torch.Tensor) if type(packed) is not torch.Tensor else packed
        if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage: reinterpret the bytes
            packed = packed.contiguous().view(torch.uint8)
        shape = tuple(int(s) for s in quant_state.shape)
        n = shape[0] * shape[1] if len(shape) == 2 else None
        if n is None:
            raise ValueError(f"sloth: an NF4 linear weight must be 2-d [out, in]; quant_state.shape is {shape}")
        if packed.numel() != (n + 1) // 2:
            raise ValueError(f"sloth: packed weight holds {packed.numel()} bytes but quant_state.shape {shape} "
                             f"needs {(n + 1) // 2}")
        args = cls(packed=packed.reshape(-1), absmax=quant_state.absmax, shape=shape,
                   blocksize=int(quant_state.blocksize), dtype=quant_state.dtype)
        if quant_state.nested:
            args.code2 = quant_state.state2.code
            args.absmax2 = quant_state.state2.absmax
            args.blocksize2 = int(quant_state.state2.blocksize)
            off = quant_state.offset
            if not isinstance(off, torch.Tensor):
                off = torch.tensor(float(off), dtype=torch.float32, device=packed.device)
            args.offset = off.reshape(()).to(torch.float32)
        blocks = -(-n // args.blocksize)
        if args.absmax.dtype not in (torch.float32, torch.uint8) or args.absmax.numel() != blocks:
            raise ValueError(f"sloth: quant_state.absmax must be fp32 or uint8 with {blocks} entries, got "
                             f"{args.absmax.dtype} {tuple(args.absmax.shape)}")
        if args.absmax.dtype == torch.uint8 and args.code2 is None:
            raise ValueError("sloth: uint8 absmax (double quantization) needs quant_state.state2 and offset")
        args.absmax = args.absmax.reshape(-1)
        for name in ("absmax", "code2", "absmax2", "offset"):
            t = getattr(args, name)
            if t is not None and t.device != packed.device:
                raise ValueError(f"sloth: quant_state.{name} is on {t.device} but the weight is on {packed.device}")
        return args

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """Dequantize into ``out`` (contiguous, ``numel`` elements, any float dtype); returns ``out``."""
        check_device_supported(out, "nf4_dequantize_out")
        torch.ops.sloth.nf4_dequantize_out(self.packed, self.absmax, self.blocksize, self.code2, self.absmax2,
                                           self.offset, self.blocksize2, out)
        return out


def nf4_gemv_lora(x: torch.Tensor, w: NF4Args, lora_t=None, lora_B=None, scaling: float = 0.0,
                  bias=None) -> torch.Tensor:
    """``x [M, K] W^T + scaling * lora_t [M, r] lora_B [N, r]^T + bias`` -> ``[M, N]`` (M <= 16 on CUDA).

    Traffic on CUDA: the packed weight once (N * K / 2 bytes) plus x, B and y; fp32 accumulation.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, dim=2, device=w.packed.device)
    check_device_supported(x, "nf4_gemv_lora")
    return torch.ops.sloth.nf4_gemv_lora(x, w.packed, w.absmax, w.shape[0], w.blocksize, w.code2, w.absmax2,
                                         w.offset, w.blocksize2, lora_t, lora_B, float(scaling), bias)


def gemv_available(x: torch.Tensor, w: NF4Args) -> bool:
    """Whether the fused GEMV kernel runs for this call (CUDA, not ROCm, bf16/fp16, M <= 16, K % 32 == 0,
    K < 2^30)."""
    return (x.is_cuda and torch.version.hip is None and x.dtype in (torch.bfloat16, torch.float16)
            and 1 <= x.shape[0] <= GEMV_MAX_M and w.shape[1] % 32 == 0 and w.shape[1] < 2**30)


@torch.library.register_fake("sloth::nf4_dequantize_out")
def _(packed, absmax, blocksize, code2, absmax2, offset, blocksize2, out):
    return None


@torch.library.register_fake("sloth::nf4_gemv_lora")
def _(x, packed, absmax, out_features, blocksize, code2, absmax2, offset, blocksize2, lora_t, lora_B, scaling, bias):
    return x.new_empty((x.shape[0], out_features))
