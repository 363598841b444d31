"""What makes one projection (a PEFT LoRA layer, a bitsandbytes NF4 linear, an ``nn.Linear``) eligible for sloth's
fused LoRA linear, and the dtype rules its fast path keeps: shared by the LoRA layers (:mod:`.peft`), the MLP
(:mod:`.mlp`), the grouped q / k / v projections (:mod:`.qkv`) and saved attention (:mod:`.sdpa`)."""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from ..nn.lora_mlp import LoraProj

logger = logging.getLogger("sloth.peft")


def lora_classes():
    from peft.tuners import lora

    classes = [lora.Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit

        classes.append(Linear4bit)
    except (ImportError, AttributeError):  # peft without bitsandbytes support
        pass
    return tuple(classes)


def base_weight(layer):
    """(weight, quant_state, bias, compute_dtype) of the base layer, or None if it is not a supported linear."""
    base = layer.get_base_layer()
    if getattr(layer, "fan_in_fan_out", False):
        return None
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is not None:  # bitsandbytes Linear4bit (quantized); not its AVX512 CPU repacking
        if getattr(qs, "quant_type", None) != "nf4" or getattr(qs, "packing_format_for_cpu", False):
            return None
        return w, qs, base.bias, getattr(base, "compute_dtype", None)
    if type(base) is torch.nn.Linear and w.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return w, None, base.bias, None
    return None


def fast_adapter(layer, args, kwargs):
    """The one active adapter name if the layer can take the sloth path for this call, else None."""
    if args or any(k != "adapter_names" for k in kwargs) or kwargs.get("adapter_names") is not None:
        return None
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A.keys()]
    if len(active) != 1:
        if len(active) > 1 and not getattr(layer, "_sloth_noted", False):
            layer._sloth_noted = True
            logger.info("sloth: %s has %d active adapters; using PEFT's forward for it", type(layer).__name__,
                        len(active))
        return None
    a = active[0]
    if a in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(a, False):
        return None
    if getattr(layer.lora_B[a], "bias", None) is not None or not isinstance(layer.lora_A[a], torch.nn.Linear):
        return None
    return a


def lora_dropout_active(layer, adapter: str) -> bool:
    """Whether the adapter's LoRA dropout changes x in this call (p > 0, training)."""
    dropout = layer.lora_dropout[adapter]
    return isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and dropout.training


def run_dtype(x: torch.Tensor, compute_dtype) -> torch.dtype:
    """The dtype the layer's matmuls run in: autocast's when it is on (as it would run the linears), else the
    base layer's compute dtype (bitsandbytes), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return compute_dtype or x.dtype


def autocast_off(device_type: str):
    """A context with autocast off on ``device_type``: ``torch.autocast(..., enabled=False)`` when autocast is on,
    else nothing (entering an autocast context costs a few microseconds, on every projection of every layer)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
        else contextlib.nullcontext()


def as_layer_output(y: torch.Tensor, in_dtype: torch.dtype, quant_state) -> torch.Tensor:
    """y in the dtype the layer's own forward returns: x's for a bitsandbytes 4-bit layer (quant_state given),
    the compute dtype (y's) for a 16-bit one."""
    return y.to(in_dtype) if quant_state is not None else y


def fast_projection(layer) -> Optional[tuple]:
    """(LoraProj, compute dtype or None) for one projection (a PEFT LoRA layer, a bitsandbytes NF4 linear or
    an nn.Linear), or None when it is not on sloth's fast path."""
    if getattr(layer, "_hf_hook", None) is not None or layer._forward_hooks or layer._forward_pre_hooks:
        return None
    if isinstance(layer, lora_classes()):
        adapter = fast_adapter(layer, (), {})
        base = base_weight(layer) if adapter is not None else None
        if base is None or lora_dropout_active(layer, adapter):
            return None
        weight, qs, bias, compute_dtype = base
        return LoraProj(weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                        float(layer.scaling[adapter]), bias, qs), compute_dtype
    weight = getattr(layer, "weight", None)
    qs = getattr(weight, "quant_state", None)
    if qs is not None and getattr(qs, "quant_type", None) == "nf4" and not getattr(qs, "packing_format_for_cpu", False):
        return LoraProj(weight, None, None, 1.0, layer.bias, qs), getattr(layer, "compute_dtype", None)
    if type(layer) is torch.nn.Linear and weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return LoraProj(weight, None, None, 1.0, layer.bias, None), None
    return None
