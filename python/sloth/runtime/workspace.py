"""A reusable per-device, per-dtype scratch buffer for dequantized weights (grows, never shrinks)."""

from __future__ import annotations

import threading

import torch


class Workspace:
    """``Workspace.get(numel, dtype, device)`` returns a contiguous 1-d view of a shared buffer.

    One buffer per (device, dtype). A view is valid until the next ``get`` for the same (device, dtype):
    callers dequantize into it and consume it in the same stream right away (GEMMs are stream-ordered, so
    the next dequantize cannot overwrite it before the GEMM has read it).
    """

    _buffers: dict = {}
    _lock = threading.Lock()

    @classmethod
    def get(cls, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (torch.device(device), dtype)
        with cls._lock:
            buf = cls._buffers.get(key)
            if buf is None or buf.numel() < numel:
                cls._buffers[key] = None  # free the old buffer before allocating the larger one
                buf = torch.empty(numel, dtype=dtype, device=device)
                cls._buffers[key] = buf
        return buf[:numel]

    @classmethod
    def clear(cls) -> None:
        """Free every buffer (e.g. after training, before inference with other shapes)."""
        with cls._lock:
            cls._buffers.clear()

    @classmethod
    def nbytes(cls) -> int:
        return sum(b.numel() * b.element_size() for b in cls._buffers.values() if b is not None)
