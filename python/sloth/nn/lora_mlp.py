"""LoRA MLP: down(act(gate(x)) * up(x)) with gate / up / down QLoRA linears and the fused GLU activation."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..ops.glu import glu_kind
from .glu import GluFunction
from .lora_linear import _lora_linear


class LoraProj(NamedTuple):
    """One projection of the MLP: the arguments of :func:`sloth.lora_linear`."""

    weight: torch.Tensor
    lora_A: Optional[torch.Tensor] = None
    lora_B: Optional[torch.Tensor] = None
    scaling: float = 1.0
    bias: Optional[torch.Tensor] = None
    quant_state: object = None


def _proj(x, p: LoraProj, need_output: bool = True):
    return _lora_linear(x, p.weight, p.lora_A, p.lora_B, p.scaling, p.bias, p.quant_state, need_output)


def lora_mlp(x: torch.Tensor, gate: LoraProj, up: LoraProj, down: LoraProj, kind="swiglu", *,
             need_output: bool = True) -> torch.Tensor:
    """``x [..., hidden] -> [..., hidden]``: down(act(gate(x)) * up(x)). The activation's backward overwrites
    the (internal) gate / up activations with their gradients: no extra [tokens, intermediate] buffers.

    ``need_output=False`` (a recompute whose result only feeds a sum whose value nobody reads): the down
    projection's product is not computed (zeros are returned) but its backward is built, so the gradients are
    the same and one [tokens, intermediate] x [intermediate, hidden] GEMM is saved."""
    g = _proj(x, gate)  # [..., intermediate]
    u = _proj(x, up)  # [..., intermediate]
    h = GluFunction.apply(g, u, glu_kind(kind), True)  # [..., intermediate]
    return _proj(h, down, need_output)
