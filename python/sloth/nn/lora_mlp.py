"""LoRA MLP: down(act(gate(x)) * up(x)) with gate / up / down QLoRA linears and the fused GLU activation."""

from __future__ import annotations

import torch

from ..ops.glu import glu_kind
from .glu import GluFunction
from .lora_group import lora_linear_group
from .lora_linear import LoraProj, _proj

__all__ = ["LoraProj", "lora_mlp"]


def lora_mlp(x: torch.Tensor, gate: LoraProj, up: LoraProj, down: LoraProj, kind="swiglu", *,
             need_output: bool = True) -> torch.Tensor:
    """``x [..., hidden] -> [..., hidden]``: down(act(gate(x)) * up(x)). The activation's backward overwrites
    the (internal) gate / up activations with their gradients: no extra [tokens, intermediate] buffers. gate and
    up share x: their LoRA A products are one GEMM each way (:func:`sloth.nn.lora_group.lora_linear_group`).

    ``need_output=False`` (a recompute whose result only feeds a sum whose value nobody reads): the down
    projection's product is not computed (zeros are returned) but its backward is built, so the gradients are
    the same and one [tokens, intermediate] x [intermediate, hidden] GEMM is saved."""
    g, u = lora_linear_group(x, [gate, up])  # [..., intermediate] each: one GEMM for both LoRA A products
    h = GluFunction.apply(g, u, glu_kind(kind), True)  # [..., intermediate]
    return _proj(h, down, need_output)
