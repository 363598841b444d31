"""Buffers for dequantized weights: a reusable per-device, per-dtype scratch buffer (grows, never shrinks), and
a small LRU cache of the weights a backward will need again."""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from typing import Optional

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
        """Free every buffer, the DequantCache's too (e.g. after training, before inference with other shapes)."""
        with cls._lock:
            cls._buffers.clear()
        DequantCache.clear()

    @classmethod
    def nbytes(cls) -> int:
        return sum(b.numel() * b.element_size() for b in cls._buffers.values() if b is not None)


class DequantCache:
    """Dequantized copies of the frozen weights most recently used with a graph, so that the backward that
    follows a forward of the same weights (under gradient checkpointing: the recomputed layer's forward, then
    its backward) reuses them instead of dequantizing again. LRU, bounded by ``budget_bytes``
    (``SLOTH_DEQUANT_CACHE_MIB``, default 512 MiB: one Llama-3-8B decoder layer's seven projections in bf16).

    An entry is keyed by the quantization state object (held weakly: a new or freed state never hits a stale
    copy), the packed data's address and the dtype.
    """

    budget_bytes = int(os.environ.get("SLOTH_DEQUANT_CACHE_MIB", "512")) << 20
    _entries: "OrderedDict" = OrderedDict()  # key -> (weakref to the quant state, tensor)
    _free: list = []  # evicted buffers, reused by the next insert of the same size, dtype and device
    _lock = threading.Lock()

    @classmethod
    def lookup(cls, key, owner) -> Optional[torch.Tensor]:
        """The cached tensor of ``key`` if its owner is still ``owner``, else None."""
        with cls._lock:
            hit = cls._entries.get(key)
            if hit is None:
                return None
            if hit[0]() is not owner:
                cls._free.append(cls._entries.pop(key)[1])
                return None
            cls._entries.move_to_end(key)
            return hit[1]

    @classmethod
    def insert(cls, key, owner, numel: int, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
        """A 1-d buffer of ``numel`` elements registered under ``key`` for the caller to fill (stream-ordered, like
        Workspace), evicting the least recently used entries; None when it exceeds the whole budget."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes > cls.budget_bytes:
            return None
        device = torch.device(device)
        with cls._lock:
            old = cls._entries.pop(key, None)
            if old is not None:
                cls._free.append(old[1])
            while cls._entries and cls._used() + nbytes > cls.budget_bytes:
                cls._free.append(cls._entries.popitem(last=False)[1][1])
            buf = None
            for i, b in enumerate(cls._free):
                if b.numel() == numel and b.dtype == dtype and b.device == device:
                    buf = cls._free.pop(i)
                    break
            cls._free.clear()  # the rest go back to the caching allocator
            if buf is None:
                buf = torch.empty(numel, dtype=dtype, device=device)
            cls._entries[key] = (weakref.ref(owner), buf)
            return buf

    @classmethod
    def _used(cls) -> int:
        return sum(t.numel() * t.element_size() for _, t in cls._entries.values())

    @classmethod
    def clear(cls) -> None:
        with cls._lock:
            cls._entries.clear()
            cls._free.clear()

    @classmethod
    def nbytes(cls) -> int:
        with cls._lock:
            return cls._used()
