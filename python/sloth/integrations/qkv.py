"""An attention's q, k, v LoRA projections through :func:`sloth.nn.lora_group.lora_linear_group`.

While a patched attention's forward runs (:func:`qkv_group`), the first call of its ``q_proj`` computes q, k
and v at once (the three LoRA A products in one GEMM, forward and backward) and keeps k and v for the
``k_proj`` / ``v_proj`` calls that follow with the same, unmodified input tensor; any other call runs the
layer's own sloth path. Grouping needs all three to be PEFT LoRA layers on the fast path (one adapter, no
dropout in training, one compute dtype); otherwise nothing changes.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

from ..nn.lora_group import lora_linear_group
from .projections import as_layer_output, autocast_off, fast_projection, run_dtype

NAMES = ("q_proj", "k_proj", "v_proj")

_group = contextvars.ContextVar("sloth_qkv_group", default=None)


class _Group:
    def __init__(self, modules, need_output: bool):
        self.modules = modules  # [q_proj, k_proj, v_proj]
        self.need_output = need_output  # False: zeros stand for q, k, v (their values come from elsewhere)
        self.pending = {}  # module -> (x, x._version, y): the outputs computed with q's call
        self.computed = False  # whether the three were computed together


@contextlib.contextmanager
def qkv_group(attention: torch.nn.Module, need_output: bool = True):
    """Group ``attention``'s q, k, v projections for the duration of its forward (see the module docstring);
    yields the group (None when grouping is off or a projection is missing). ``need_output=False``: the grouped
    call computes only what the backward needs and returns zeros for q, k, v (an offloaded checkpoint's recompute
    that takes their values from the forward, see :mod:`sloth.integrations.sdpa`)."""
    modules = [getattr(attention, n, None) for n in NAMES]
    ok = all(isinstance(m, torch.nn.Module) for m in modules)
    group = _Group(modules, need_output) if ok else None
    token = _group.set(group)
    try:
        yield group
    finally:
        _group.reset(token)


def grouped_forward(layer: torch.nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``layer(x)`` from the active group: computed with k and v when ``layer`` is the group's q_proj, taken from
    the group when it is k_proj / v_proj and q_proj saw the same ``x``; None when the layer must run by itself."""
    if torch.compiler.is_compiling():  # a run-time cache of eager calls (and a ContextVar): left to the compiler
        return None
    grp = _group.get()
    if grp is None or not any(layer is m for m in grp.modules):
        return None
    hit = grp.pending.pop(layer, None)
    if hit is not None:
        return hit[2] if hit[0] is x and hit[1] == x._version else None
    if layer is not grp.modules[0]:
        return None
    projs = [fast_projection(m) for m in grp.modules]  # (LoraProj, compute dtype) or None
    if any(p is None or p[0].lora_A is None for p in projs):
        return None
    dts = {run_dtype(x, cd) for _, cd in projs}
    if len(dts) != 1:
        return None
    with autocast_off(x.device.type):
        ys = lora_linear_group(x.to(dts.pop()), [p for p, _ in projs], grp.need_output)
    grp.computed = True
    ys = [as_layer_output(y, x.dtype, p.quant_state) for y, (p, _) in zip(ys, projs)]
    for m, y in zip(grp.modules[1:], ys[1:]):
        grp.pending[m] = (x, x._version, y)
    return ys[0]
