"""The training loss: the decoder's last hidden states into sloth's chunked linear cross-entropy (the logits
are never materialized)."""

from __future__ import annotations

import torch

from ..nn.linear_cross_entropy import causal_lm_loss
from .data import IGNORE_INDEX


def causal_lm(model):
    """The ``*ForCausalLM`` inside ``model`` (unwrapping a PEFT model)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def count_items(labels: torch.Tensor) -> int:
    """Number of tokens the loss is taken over: labels after the causal shift that are not ignored."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())  # labels [B, T]


def sloth_loss(model, batch: dict, num_items_in_batch, compute_dtype: torch.dtype) -> torch.Tensor:
    """Sum of the token losses of ``batch`` divided by ``num_items_in_batch`` (the unmasked tokens of all the
    micro-batches of one optimizer step, so that accumulation equals one big batch). 0-d fp32."""
    lm = causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
    head = lm.get_output_embeddings()
    cfg = lm.config
    autocast = compute_dtype != torch.float32
    with torch.autocast(batch["input_ids"].device.type, dtype=compute_dtype, enabled=autocast):
        out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # [B, T, H]
    weight = head.weight  # [V, H]
    hidden = hidden.to(weight.dtype)
    return causal_lm_loss(
        hidden, weight, batch["labels"], num_items_in_batch=num_items_in_batch, bias=getattr(head, "bias", None),
        final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None),
        logit_scale=getattr(cfg, "logit_scale", None))
