"""Plain-PyTorch GLU activations (the oracle of torch.ops.sloth.glu_*): fp32, gradients by autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def act(gate: torch.Tensor, kind: int) -> torch.Tensor:
    g = gate.float()
    if kind == 0:
        return F.silu(g)
    if kind == 1:
        return F.gelu(g, approximate="tanh")
    if kind == 2:
        return F.gelu(g)
    raise ValueError(kind)


def glu_forward(gate, up, kind: int) -> torch.Tensor:
    """fp32 act(gate) * up."""
    return act(gate, kind) * up.float()


def glu_backward(grad, gate, up, kind: int):
    """(d_gate, d_up) in fp32 by autograd through glu_forward."""
    g = gate.detach().float().requires_grad_()
    u = up.detach().float().requires_grad_()
    h = act(g, kind) * u
    dg, du = torch.autograd.grad(h, (g, u), grad.float())
    return dg, du
