"""The CUDA caching-allocator setting sloth's offloaded checkpointing turns on: expandable segments, unless the user
chose a setting.

Training with offloaded checkpoints allocates and frees blocks of many sizes (each layer's prefetched input and
saved attention, the chunks of the cross-entropy and of the MLP recompute): with fixed-size segments the cache
fragments, and the cudaMalloc / cudaFree churn costs step time (benchmarks/NOTES.md). Expandable segments grow one
mapping per stream instead.

:func:`use_expandable_segments` is called when ``use_gradient_checkpointing="sloth"`` is set on a model. It applies
the setting to the running allocator (segments allocated from then on; nothing already allocated moves) and leaves
the environment alone, so child processes and libraries that check ``PYTORCH_CUDA_ALLOC_CONF`` (vLLM's sleep mode,
CUDA IPC) see what they did before. Nothing is changed when ``PYTORCH_CUDA_ALLOC_CONF`` or ``PYTORCH_ALLOC_CONF``
is set (the user's choice wins), on ROCm or CPU-only builds of torch, or with ``SLOTH_EXPANDABLE_SEGMENTS=0``.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from .. import config

logger = logging.getLogger("sloth")

_KEYS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
_SETTING = "expandable_segments:True"
_applied: list = []  # [True] once the setting was applied in this process


def _setter():
    """torch's function that applies allocator settings at run time (newer: the accelerator-wide one)."""
    return getattr(torch._C, "_accelerator_setAllocatorSettings", None) or \
        getattr(torch._C, "_cuda_cudaCachingAllocator_set_allocator_settings", None)


def use_expandable_segments() -> bool:
    """Turn on expandable segments of torch's CUDA allocator (see the module docstring); whether they are on by
    sloth's doing (applied now or earlier in this process)."""
    if _applied:
        return True
    if not config.EXPANDABLE_SEGMENTS or any(os.environ.get(k) for k in _KEYS):
        return False
    if torch.version.cuda is None or getattr(torch.version, "hip", None):
        return False
    setter = _setter()
    if setter is None:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setter(_SETTING)
    except Exception as e:  # noqa: BLE001 - a torch without this setting: train as before
        logger.debug("sloth: expandable segments not set (%s: %s)", type(e).__name__, e)
        return False
    _applied.append(True)
    return True
