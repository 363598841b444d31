"""Device and compute dtype of a run: cuda when there is a GPU, else cpu; bf16 on GPUs that support it, fp32
on the CPU."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .errors import FinetuneError

_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: Optional[str]) -> torch.device:
    """``device`` when given (checked), else cuda if available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FinetuneError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("device cuda asked for but no CUDA GPU is visible; leave the device out to run on the CPU")
    return dev


def resolve_dtype(name: str, device: torch.device) -> Tuple[torch.dtype, str]:
    """(torch dtype, name) of ``--dtype`` on ``device``: auto is bf16 on a GPU with bf16, fp16 on an older GPU,
    fp32 on the CPU."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name not in _NAMES:
        raise FinetuneError(f"--dtype must be auto, bf16, fp16 or fp32, got {name!r}")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FinetuneError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use --dtype fp16")
    if name == "fp16" and device.type == "cpu":
        raise FinetuneError("--dtype fp16 is not supported on the CPU; use --dtype fp32 or bf16")
    return _NAMES[name], name
