"""Gradient (activation) checkpointing of a Transformers model: ``"sloth"`` (offloaded), ``True`` (Transformers'
own, non-reentrant) or ``False`` (none).

``"sloth"`` puts :func:`sloth.runtime.offload_checkpoint.offloaded_checkpoint` in every ``GradientCheckpointingLayer``
(``_gradient_checkpointing_func``, which the layer calls as ``func(partial(forward, layer, **kwargs), *args)``).
The choice sticks: a later ``model.gradient_checkpointing_enable()`` / ``activation_checkpointing_enable()`` (as a
Trainer with ``gradient_checkpointing=True`` makes) keeps the offloaded function, because the model's
``_set_gradient_checkpointing``, through which both go, is wrapped on the instance; :func:`set_gradient_checkpointing`
with ``True`` / ``False`` removes the wrapper.
"""

from __future__ import annotations

import inspect
import types
from typing import Union

from ..runtime.allocator import use_expandable_segments
from ..runtime.offload_checkpoint import offloaded_checkpoint
from ._models import peft_parts

_MODE = "_sloth_gradient_checkpointing"  # on the Transformers model: the mode last set ("sloth", True, False)
_STICKY = "_set_gradient_checkpointing"  # the instance attribute that makes "sloth" stick

Mode = Union[str, bool]


def transformers_model(model):
    """The Transformers ``PreTrainedModel`` inside ``model`` (a PeftModel's base model, else ``model``)."""
    return peft_parts(model)[0]


def normalize_mode(mode) -> Mode:
    """``"sloth"``, True or False from what a user may pass (``"sloth"``, ``"unsloth"``, bools, None)."""
    if mode is None or mode is False:
        return False
    if mode is True:
        return True
    if isinstance(mode, str) and mode.lower() in ("sloth", "unsloth"):
        return "sloth"
    raise ValueError(f"sloth: use_gradient_checkpointing must be \"sloth\" (offloaded), True (Transformers' "
                     f"checkpointing) or False, got {mode!r}")


def _install_sticky(base) -> None:
    original = type(base)._set_gradient_checkpointing.__get__(base)
    takes_every_n = "every_n_layers" in inspect.signature(original).parameters

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=None, every_n_layers=1):
        kw = {"every_n_layers": every_n_layers} if takes_every_n else {}
        return original(enable=enable, gradient_checkpointing_func=offloaded_checkpoint, **kw)

    base.__dict__[_STICKY] = types.MethodType(_set_gradient_checkpointing, base)


def _remove_sticky(base) -> None:
    base.__dict__.pop(_STICKY, None)


def _enable(base) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # Transformers >= 5.x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _disable(base) -> None:
    if hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def set_gradient_checkpointing(model, mode: Mode = "sloth") -> None:
    """Checkpoint every decoder layer of ``model`` (a Transformers model or a PeftModel): ``"sloth"`` keeps only
    each layer's input hidden state, offloaded to pinned host memory on CUDA (plain checkpointing elsewhere);
    ``True`` uses Transformers' own non-reentrant checkpointing; ``False`` turns checkpointing off. With
    checkpointing the KV cache is turned off (``config.use_cache = False``) and the input embeddings' output
    requires grad, so frozen-base LoRA training gets gradients. ``"sloth"`` also turns on the CUDA allocator's
    expandable segments unless you chose allocator settings (:mod:`sloth.runtime.allocator`)."""
    mode = normalize_mode(mode)
    base = transformers_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"sloth: {type(base).__name__} does not support gradient checkpointing; pass "
                         f"use_gradient_checkpointing=False")
    _remove_sticky(base)
    base.__dict__[_MODE] = mode
    if mode is False:
        _disable(base)
        return
    if mode == "sloth":
        _install_sticky(base)
        use_expandable_segments()  # the offloads' many block sizes fragment a fixed-segment cache
    _enable(base)
    if not getattr(base, "_require_grads_hooks", None) and not hasattr(base, "_require_grads_hook"):
        base.enable_input_require_grads()
    base.config.use_cache = False


def gradient_checkpointing_mode(model) -> Mode:
    """The mode last set on ``model`` by :func:`set_gradient_checkpointing` (False when never set)."""
    return transformers_model(model).__dict__.get(_MODE, False)


def pause_gradient_checkpointing(model) -> None:
    """Turn checkpointing off for inference, keeping the mode for :func:`resume_gradient_checkpointing`."""
    base = transformers_model(model)
    if getattr(base, "supports_gradient_checkpointing", False):
        _disable(base)


def resume_gradient_checkpointing(model) -> None:
    """Turn the mode last set by :func:`set_gradient_checkpointing` back on (nothing when it was False)."""
    base = transformers_model(model)
    if base.__dict__.get(_MODE, False) is not False:
        _enable(base)
        base.config.use_cache = False
