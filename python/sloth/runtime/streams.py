"""The side CUDA streams of sloth's runtime: one per (purpose, device), made on first use, owned here."""

from __future__ import annotations

import threading

import torch

#: Offloaded checkpointing's host <-> device copies (:mod:`sloth.runtime.offload_checkpoint`)
OFFLOAD = "offload"
#: Layer CUDA graph captures (:mod:`sloth.runtime.layer_graphs`)
CAPTURE = "capture"

_streams: dict = {}  # (purpose, cuda device index) -> torch.cuda.Stream
_lock = threading.Lock()


def side_stream(purpose: str, device: torch.device) -> "torch.cuda.Stream":
    """The side stream for ``purpose`` on CUDA ``device`` (the same one on every call)."""
    key = (purpose, device.index)
    s = _streams.get(key)
    if s is None:
        with _lock:
            s = _streams.get(key)
            if s is None:
                s = _streams[key] = torch.cuda.Stream(device=device)
    return s


def synchronize(purpose: str) -> None:
    """Wait for the work queued on every side stream of ``purpose`` made so far."""
    for (p, _), s in list(_streams.items()):
        if p == purpose:
            s.synchronize()
