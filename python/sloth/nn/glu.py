"""Differentiable fused GLU activation: h = act(gate) * up (SwiGLU / GeGLU), one kernel each way."""

from __future__ import annotations

import torch

from ..ops.glu import glu_backward_, glu_forward, glu_kind


class GluFunction(torch.autograd.Function):
    """Saves gate and up; backward writes d_gate / d_up over them in place when ``inplace`` (the caller owns
    both, e.g. lora_mlp), else over copies."""

    @staticmethod
    def forward(ctx, gate, up, kind: int, inplace: bool):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.kind, ctx.inplace = kind, inplace
        ctx.save_for_backward(gate, up)
        return glu_forward(gate, up, kind)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        if not ctx.inplace:
            gate, up = gate.clone(), up.clone()
        glu_backward_(dh.contiguous(), gate, up, ctx.kind)  # gate <- d_gate, up <- d_up
        return gate, up, None, None


def glu(gate: torch.Tensor, up: torch.Tensor, kind="swiglu") -> torch.Tensor:
    """``act(gate) * up`` for kind "swiglu" (silu), "geglu_tanh" (tanh GELU) or "geglu" (erf GELU); any shape."""
    return GluFunction.apply(gate, up, glu_kind(kind), False)
