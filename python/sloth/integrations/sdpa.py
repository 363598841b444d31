"""Transformers' ``"sdpa"`` attention function, through which offloaded checkpoints save the attention output.

Transformers looks an attention's computation up in its registry (``AttentionInterface``) by the configuration's
``_attn_implementation``. :func:`install` (called by :func:`sloth.patch`, once per process) registers, under
``"sdpa"``, a function that hands the call to :func:`sloth.nn.saved_attention.causal_attention` while an
offloaded checkpoint collects or replays saved attentions on this thread (``use_gradient_checkpointing="sloth"``,
on CUDA, beyond the CUDA-graph size), and to the original ``"sdpa"`` function otherwise or whenever that returns
None (a mask, dropout, an unsupported shape): models sloth did not patch, inference and every other case compute
exactly what they did.
"""

from __future__ import annotations

from ..nn import saved_attention

_ORIGINAL = "_sloth_original"  # attribute of the registered function: the "sdpa" function it wraps


def _wrap(original):
    def sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               is_causal=None, **kwargs):
        if saved_attention.active():
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            out = saved_attention.causal_attention(query, key, value, attention_mask, dropout, scaling, causal, kwargs)
            if out is not None:
                return out, None
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)

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
