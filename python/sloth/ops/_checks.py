"""Argument checks shared by the op wrappers: each raises an error that says what to do."""

from __future__ import annotations

import torch

from .. import _build_config

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HAS_GPU_KERNELS = "cuda" in _build_config.BACKENDS or "hip" in _build_config.BACKENDS


def check_tensor(name: str, t, *, dtypes=None, dim=None, device=None) -> None:
    """Raise TypeError / ValueError unless `t` is a tensor of one of `dtypes`, `dim` dims, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"sloth: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"sloth: {name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"sloth: {name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(
            f"sloth: {name} is on {t.device} but the other inputs are on {device}; move them to one device"
        )


def check_out_dtype(dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"sloth: output dtype must be float32, float16 or bfloat16, got {dtype}")


def check_device_supported(t: torch.Tensor, op: str) -> None:
    """Raise a clear error when no sloth kernel exists for t's device."""
    if t.device.type in ("cpu", "meta"):
        return
    if t.device.type == "cuda":
        if not _HAS_GPU_KERNELS:
            raise RuntimeError(
                f"sloth.{op}: this build of sloth has no GPU kernels (built for {_build_config.BACKENDS}); "
                "install the wheel for your CUDA/ROCm version or rebuild from source with nvcc on PATH"
            )
        return
    raise RuntimeError(f"sloth.{op}: tensors on {t.device.type} are not supported; use cpu or cuda")
