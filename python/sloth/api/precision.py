"""The compute dtype of a loaded model: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU, or what
the user asks for (checked against the device)."""

from __future__ import annotations

from typing import Optional, Union

import torch

_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype) -> str:
    """``bf16`` / ``fp16`` / ``fp32``."""
    return _SHORT.get(dtype, str(dtype).replace("torch.", ""))


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """A torch floating dtype from a dtype or its name (``"bfloat16"``, ``"bf16"``, ``"float16"``, ...); None and
    ``"auto"`` give None (pick for the device)."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return None
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _NAMES:
        return _NAMES[dtype.lower().removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in _SHORT:
        return dtype
    raise ValueError(f"sloth: dtype must be None (pick for the device), torch.bfloat16, torch.float16 or "
                     f"torch.float32 (or their names), got {dtype!r}")


def resolve_dtype(dtype, device_type: str, bf16_supported: Optional[bool] = None,
                  device_name: Optional[str] = None) -> torch.dtype:
    """The compute dtype for ``dtype`` (see :func:`parse_dtype`) on a ``device_type`` ("cuda" / "cpu") device:
    None gives bf16 on a GPU with bf16, fp16 on one without, fp32 on the CPU. Asking for bf16 on a GPU without it
    is an error. ``bf16_supported`` / ``device_name`` default to those of the current CUDA device."""
    asked = parse_dtype(dtype)
    if device_type != "cuda":
        return asked or torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if asked is None:
        return torch.bfloat16 if bf16_supported else torch.float16
    if asked == torch.bfloat16 and not bf16_supported:
        name = device_name or torch.cuda.get_device_name()
        raise ValueError(f"sloth: dtype=bfloat16 but the GPU ({name}) has no bf16 support; pass dtype=torch.float16 "
                         f"or dtype=None")
    return asked
