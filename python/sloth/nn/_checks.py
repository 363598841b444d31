"""Argument checks shared by the linear cross-entropy / log-prob entry points."""

from __future__ import annotations

import torch

from ..ops._checks import FLOAT_DTYPES, check_device_supported, check_tensor

LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def check_linear_head(op: str, hidden, weight, labels, bias, labels_name: str = "labels") -> None:
    """hidden [..., H] float, weight [V, H] same dtype and device, labels [...] integer, bias [V] or None."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, dim=2, device=hidden.device)
    if hidden.dim() < 1:
        raise ValueError("sloth: hidden must have shape [..., hidden_size], got a 0-d tensor")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"sloth.{op}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them "
                        "(e.g. hidden.to(weight.dtype)) so the GEMM runs in one dtype")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"sloth.{op}: weight is {tuple(weight.shape)} = [vocab, hidden] but hidden has "
                         f"hidden size {hidden.shape[-1]} (shape {tuple(hidden.shape)})")
    if weight.shape[0] < 1:
        raise ValueError(f"sloth.{op}: weight has an empty vocabulary (shape {tuple(weight.shape)})")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"sloth.{op}: {labels_name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"sloth.{op}: {labels_name} must be an integer tensor (int64 token ids), got {labels.dtype}")
    if labels.device != hidden.device:
        raise ValueError(f"sloth.{op}: {labels_name} is on {labels.device} but hidden is on {hidden.device}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"sloth.{op}: {labels_name} has shape {tuple(labels.shape)} but hidden is "
                         f"{tuple(hidden.shape)}; expected {labels_name} of shape {tuple(hidden.shape[:-1])}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(hidden.dtype,), dim=1, device=hidden.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"sloth.{op}: bias has {bias.shape[0]} entries but weight has {weight.shape[0]} rows")
    check_device_supported(hidden, op)
