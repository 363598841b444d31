"""Plain-PyTorch QLoRA linear: dequantize to fp32, then matmuls (the oracle of sloth.lora_linear)."""

from __future__ import annotations

import torch

from . import mxfp4 as _mx
from . import nf4 as _nf4


def dequantize_weight(weight: torch.Tensor, quant_state=None) -> torch.Tensor:
    """The fp32 [out, in] weight: dense as is, NF4 packed + quant_state (bnb QuantState / sloth NF4State), or MXFP4
    blocks + MXFP4State."""
    if quant_state is None:
        return weight.float()
    if hasattr(quant_state, "scales"):  # MXFP4State: blocks [out, G, 16], scales [out, G]
        return _mx.mxfp4_dequantize(weight, quant_state.scales, torch.float32)
    packed = weight.data.as_subclass(torch.Tensor).contiguous().view(torch.uint8)
    kw = {}
    if quant_state.nested:
        kw = dict(code2=quant_state.state2.code, absmax2=quant_state.state2.absmax,
                  offset=quant_state.offset, blocksize2=quant_state.state2.blocksize)
    return _nf4.nf4_dequantize(packed, quant_state.absmax, tuple(quant_state.shape), quant_state.blocksize,
                               torch.float32, **kw)


def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, quant_state=None) -> torch.Tensor:
    """fp32 ``x W^T + scaling * (x A^T) B^T + bias``; differentiable in x, A, B when they require grad."""
    W = dequantize_weight(weight, quant_state)  # [out, in] fp32
    y = x.float() @ W.t()
    if lora_A is not None:
        y = y + scaling * ((x.float() @ lora_A.float().t()) @ lora_B.float().t())
    if bias is not None:
        y = y + bias.float()
    return y
