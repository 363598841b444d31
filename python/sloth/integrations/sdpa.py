"""Transformers' ``"sdpa"`` attention function, through which offloaded checkpoints save the attention output;
and a patched attention module's forward under such a checkpoint (:func:`checkpointed_attention_forward`).

Transformers looks an attention's computation up in its registry (``AttentionInterface``) by the configuration's
``_attn_implementation``. :func:`install` (called by :func:`sloth.patch`, once per process) registers, under
``"sdpa"``, a function that hands the call to :func:`sloth.runtime.saved_attention.causal_attention` while an
offloaded checkpoint collects or replays saved attentions on this thread (``use_gradient_checkpointing="sloth"``,
on CUDA, see that module for which layers), and to the original ``"sdpa"`` function otherwise or whenever that returns
None (a mask, dropout, an unsupported shape): models sloth did not patch, inference and every other case compute
exactly what they did.
"""

from __future__ import annotations

import torch

from ..runtime import saved_attention
from .peft import skip_output
from .projections import fast_projection, lora_classes
from .qkv import qkv_group

_ORIGINAL = "_sloth_original"  # attribute of the registered function: the "sdpa" function it wraps


def _wrap(original):
    def sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
        if not args and not torch.compiler.is_compiling() and saved_attention.active():
            rest = {k: v for k, v in kwargs.items() if k not in ("dropout", "scaling", "is_causal")}
            is_causal = kwargs.get("is_causal")
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            out = saved_attention.causal_attention(query, key, value, attention_mask, kwargs.get("dropout", 0.0),
                                                   kwargs.get("scaling"), causal, rest)
            if out is not None:
                return out, None
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    setattr(sdpa_attention_forward, _ORIGINAL, original)
    sdpa_attention_forward.__doc__ = (original.__doc__ or "") + \
        "\n(sloth: the output saved by an offloaded checkpoint, see sloth.integrations.sdpa)"
    return sdpa_attention_forward


def install() -> bool:
    """Register the wrapper as Transformers' ``"sdpa"`` attention (idempotent); False without that registry."""
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    original = AttentionInterface._global_mapping.get("sdpa")
    if original is None:
        return False
    if not hasattr(original, _ORIGINAL):
        AttentionInterface.register("sdpa", _wrap(original))
    return True


def _projections_read_back(attention: torch.nn.Module) -> bool:
    """Whether something between ``attention``'s q / k / v projections and the attention reads their values in
    its backward (Qwen3's and Gemma 3's q / k norms): the projections' outputs cannot then be skipped."""
    return any(isinstance(getattr(attention, n, None), torch.nn.Module) for n in ("q_norm", "k_norm"))


def checkpointed_attention_forward(attention: torch.nn.Module, args: tuple, kwargs: dict):
    """``attention``'s own forward (q, k, v projections grouped) inside an offloaded checkpoint that saves
    attentions (:func:`sloth.runtime.saved_attention.active`).

    Forward (collecting): the attention saved by the "sdpa" function also keeps q, k, v (after RoPE) when the
    projections were grouped and nothing else reads them back, and the module's output when ``o_proj`` is a PEFT LoRA
    layer on sloth's path. Recompute (replaying that item): the grouped q, k, v projections and ``o_proj`` compute no
    outputs (zeros stand for them, the backward graph is the same), the attention takes the saved q, k, v and O
    (:class:`~sloth.runtime.saved_attention.SavedAttentionFunction`) and the module returns the saved output under
    ``o_proj``'s history (:class:`~sloth.runtime.saved_attention.ValueOf`): the recompute is then RoPE on zeros and
    the LoRA A products, nothing else."""
    collect = saved_attention.collected()
    if collect is not None:
        n = len(collect)
        with qkv_group(attention) as group:
            out = attention._sloth_orig_forward(*args, **kwargs)
        if len(collect) == n + 1:
            item = collect[-1]
            if group is not None and group.computed and \
                    not _projections_read_back(attention):
                item.qkv = item.inputs
            o_proj = getattr(attention, "o_proj", None)
            if isinstance(out, tuple) and isinstance(o_proj, lora_classes()) and \
                    fast_projection(o_proj) is not None:
                item.o_out = out[0]
        return out
    item = saved_attention.next_replayed()
    skip_qkv = item is not None and item.qkv is not None
    o_proj = getattr(attention, "o_proj", None) if item is not None and item.o_out is not None else None
    with qkv_group(attention, need_output=not skip_qkv) as group, skip_output(o_proj) as o_skip:
        out = attention._sloth_orig_forward(*args, **kwargs)
    if skip_qkv and group is not None and group.computed and saved_attention.next_replayed() is item:
        raise RuntimeError("sloth: the recompute of an offloaded checkpoint skipped the q / k / v projections "
                           "but its attention did not take the saved values; set SLOTH_SAVE_ATTENTION=0 and "
                           "report this")
    if o_skip.used:
        out = (saved_attention.ValueOf.apply(out[0], item.o_out), *out[1:])
    return out
