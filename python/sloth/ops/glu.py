"""Fused GLU activations: SwiGLU and GeGLU (``torch.ops.sloth.glu_forward`` / ``glu_backward``)."""

from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, check_device_supported, check_tensor

#: Activation kinds: name -> the ``kind`` integer of the ops.
GLU_KINDS = {"swiglu": 0, "geglu_tanh": 1, "geglu": 2}


def glu_kind(kind) -> int:
    """The integer kind for a name ("swiglu", "geglu_tanh", "geglu" = erf GELU) or an int."""
    if isinstance(kind, str):
        if kind not in GLU_KINDS:
            raise ValueError(f"sloth: unknown GLU kind {kind!r}; use one of {sorted(GLU_KINDS)}")
        return GLU_KINDS[kind]
    if kind not in GLU_KINDS.values():
        raise ValueError(f"sloth: GLU kind must be 0 (swiglu), 1 (geglu_tanh) or 2 (geglu), got {kind}")
    return int(kind)


def _check_pair(a, b, an, bn):
    check_tensor(an, a, dtypes=FLOAT_DTYPES)
    check_tensor(bn, b, dtypes=(a.dtype,), device=a.device)
    if a.shape != b.shape:
        raise ValueError(f"sloth: {an} {tuple(a.shape)} and {bn} {tuple(b.shape)} must have the same shape")


def glu_forward(gate: torch.Tensor, up: torch.Tensor, kind="swiglu") -> torch.Tensor:
    """``act(gate) * up`` (same shape / dtype as ``gate``), fp32 math. Traffic: reads 2n, writes n elements."""
    _check_pair(gate, up, "gate", "up")
    check_device_supported(gate, "glu_forward")
    return torch.ops.sloth.glu_forward(gate, up, glu_kind(kind))


def glu_backward_(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind="swiglu") -> None:
    """In place: ``gate <- grad * up * act'(gate)``, ``up <- grad * act(gate)`` (contiguous gate / up)."""
    _check_pair(gate, up, "gate", "up")
    _check_pair(gate, grad, "gate", "grad")
    if not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("sloth: glu_backward_ writes gate and up in place; pass contiguous tensors")
    check_device_supported(gate, "glu_backward")
    torch.ops.sloth.glu_backward(grad, gate, up, glu_kind(kind))


@torch.library.register_fake("sloth::glu_forward")
def _(gate, up, kind):
    return torch.empty_like(gate)


@torch.library.register_fake("sloth::glu_backward")
def _(grad, gate, up, kind):
    return None
