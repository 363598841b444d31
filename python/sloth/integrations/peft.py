"""PEFT LoRA layers on sloth.lora_linear: ``patch_peft_model(model)`` / ``unpatch_peft_model(model)``.

The forward of every ``peft.tuners.lora.Linear`` (over an ``nn.Linear``) and ``peft.tuners.lora.Linear4bit``
(bitsandbytes NF4) becomes one that calls :func:`sloth.lora_linear` when the layer is on the fast path:
exactly one active adapter, vanilla LoRA (no DoRA / other variant, no LoRA bias), not merged, adapters
enabled, no mixed-batch ``adapter_names``. Anything else runs PEFT's original forward, so a patched model
never gives a different answer. ``scaling`` is PEFT's ``layer.scaling[adapter]`` (rsLoRA included).
LoRA dropout with p > 0 in training is applied to x for the LoRA branch only, as PEFT does.
"""

from __future__ import annotations

import contextlib
import contextvars
import types

import torch

from ..nn.lora_linear import _lora_linear, lora_linear
from .projections import (as_layer_output, autocast_off, base_weight, fast_adapter, lora_classes,
                          lora_dropout_active, run_dtype)
from .qkv import grouped_forward

_ORIG = "_sloth_orig_forward"   # PEFT's forward as it was bound before patching
_SAVED = "_sloth_saved_forward"  # the instance-level `forward` entry we replaced (None: there was none)
_skip = contextvars.ContextVar("sloth_skip_output", default=None)  # SkipOutput of the running recompute


class SkipOutput:
    """Which layer's next fast-path call computes no output (``used``: whether it did)."""

    def __init__(self, layer):
        self.layer, self.used = layer, False


@contextlib.contextmanager
def skip_output(layer):
    """While active, the sloth path of LoRA layer ``layer`` returns zeros for its output and builds the same
    backward (``need_output=False``: a recompute that takes the output's value from elsewhere); yields the
    :class:`SkipOutput` whose ``used`` tells whether that happened (not when the layer ran PEFT's own forward)."""
    state = SkipOutput(layer)
    token = _skip.set(state)
    try:
        yield state
    finally:
        _skip.reset(token)


def _sloth_forward(self, x, *args, **kwargs):
    if not args and not kwargs:
        y = grouped_forward(self, x)
        if y is not None:
            return y
    adapter = fast_adapter(self, args, kwargs)
    base = base_weight(self) if adapter is not None else None
    if base is None:
        return getattr(self, _ORIG)(x, *args, **kwargs)
    weight, qs, bias, compute_dtype = base
    A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight  # [r, in], [out, r]
    scaling = float(self.scaling[adapter])
    in_dtype = x.dtype
    dt = run_dtype(x, compute_dtype)
    with autocast_off(x.device.type):
        xc = x.to(dt)
        if not lora_dropout_active(self, adapter):
            skip = None if torch.compiler.is_compiling() else _skip.get()  # (a recompute of saved attention: eager)
            if skip is None or skip.layer is not self or skip.used:
                y = lora_linear(xc, weight, A, B, scaling, bias=bias, quant_state=qs)
            else:  # zeros stand for y (see skip_output)
                y = _lora_linear(xc, weight, A, B, scaling, bias, qs, False)
                skip.used = True
        else:  # dropout on the LoRA branch only: y = base(x) + s * B(A(dropout(x)))
            y = lora_linear(xc, weight, None, None, bias=bias, quant_state=qs)
            xd = self.lora_dropout[adapter](x).to(dt)
            y = y + torch.nn.functional.linear(torch.nn.functional.linear(xd, A.to(dt)), B.to(dt)) * scaling
    return as_layer_output(y, in_dtype, qs)


def patch_peft_model(model) -> int:
    """Route the forward of every PEFT LoRA Linear / Linear4bit in ``model`` through sloth.lora_linear.

    Idempotent; returns the number of layers patched by this call. Undo with :func:`unpatch_peft_model`.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, lora_classes()) and not hasattr(module, _ORIG):
            setattr(module, _SAVED, module.__dict__.get("forward"))
            setattr(module, _ORIG, module.forward)
            module.forward = types.MethodType(_sloth_forward, module)
            n += 1
    return n


def patched_lora_layers(model) -> list:
    """``(name, layer)`` of every LoRA layer of ``model`` whose forward :func:`patch_peft_model` replaced."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora_classes()) and _ORIG in m.__dict__]


def unpatch_peft_model(model) -> int:
    """Restore the forwards that :func:`patch_peft_model` replaced; returns the number of layers restored."""
    n = 0
    for module in model.modules():
        if isinstance(module, lora_classes()) and hasattr(module, _ORIG):
            saved = module.__dict__.get(_SAVED)
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
            for name in (_ORIG, _SAVED, "_sloth_noted"):
                module.__dict__.pop(name, None)
            n += 1
    return n
