"""Every runtime switch of sloth (``SLOTH_*`` environment variables), typed, documented and read here only.

A switch is read from the environment each time it is asked for (``config.CUDA_GRAPHS``), so a value set before a
call takes effect for that call; modules that decide once (at import) say so in their docstring. The table in the
README ("Runtime switches") lists the same switches; a test keeps the two in step. Build-time switches
(``SLOTH_BACKENDS``, ``SLOTH_CUDA_ARCHS``, ``SLOTH_HIP_ARCHS``) are CMake's, not these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

_FALSE = ("0", "false", "no", "off")


def _bool(text: str) -> bool:
    return text.strip().lower() not in _FALSE


def _gib(text: str) -> int:
    """GiB (a float) -> bytes."""
    return int(float(text) * 2**30)


def _int(text: str) -> int:
    return int(text)


@dataclass(frozen=True)
class Switch:
    env: str                        # the environment variable
    parse: Callable[[str], Any]     # text -> value
    default: Any                    # value when unset (None: decided by the code that reads it)
    doc: str                        # one line for the README table


SWITCHES: Dict[str, Switch] = {s.env[len("SLOTH_"):]: s for s in (
    Switch("SLOTH_CUDA_GRAPHS", _bool, True,
           "CUDA graphs of whole decoder layers under offloaded checkpointing (read at import)"),
    Switch("SLOTH_SAVE_ATTENTION", _bool, True,
           "offloaded checkpoints keep each layer's attention output so the recompute skips it (read at import)"),
    Switch("SLOTH_EXPANDABLE_SEGMENTS", _bool, True,
           "sloth's checkpointing turns on expandable segments of torch's CUDA allocator (unless "
           "PYTORCH_CUDA_ALLOC_CONF is set)"),
    Switch("SLOTH_PINNED_ARENA", _bool, False,
           "offloaded layer inputs in one exact-size page-locked region instead of torch's pinned blocks"),
    Switch("SLOTH_OFFLOAD_HOST_GB", _gib, None,
           "pinned host memory (GiB) offloaded checkpoints may hold; default: host memory less an eighth "
           "(a quarter up to 16 GiB)"),
    Switch("SLOTH_SAVE_ATTENTION_HOST_GB", _gib, None,
           "pinned host memory (GiB) saved attentions may take; default: an eighth of the host memory"),
    Switch("SLOTH_MLP_CHUNK_TOKENS", _int, None,
           "tokens per MLP chunk (0: never chunk); default: chunks only when the activations would take more "
           "than a quarter of free GPU memory"),
    Switch("SLOTH_GRAPHED_GENERATE", _bool, True,
           "generate() of a patched model decodes by replaying one CUDA graph per token"),
    Switch("SLOTH_MOE_EXPERTS", _bool, False,
           "sloth.patch puts MoE families' experts on sloth's kernels (Transformers' experts 'sloth'); off until "
           "their GPU speed passes grouped_mm (benchmarks/NOTES.md)"),
)}


def get(name: str) -> Any:
    """The value of switch ``name`` (``"CUDA_GRAPHS"`` or ``"SLOTH_CUDA_GRAPHS"``) from the environment now.
    A value that does not parse is an error naming the variable and what it takes."""
    key = name[len("SLOTH_"):] if name.startswith("SLOTH_") else name
    s = SWITCHES[key]
    text: Optional[str] = os.environ.get(s.env)
    if text is None or text.strip() == "":
        return s.default
    try:
        return s.parse(text)
    except ValueError:
        kind = {_bool: "0 or 1", _gib: "a number of GiB", _int: "an integer"}[s.parse]
        raise ValueError(f"sloth: {s.env}={text!r} is not {kind}; unset it or set it to {kind}") from None


def __getattr__(name: str) -> Any:  # config.CUDA_GRAPHS etc.
    if name in SWITCHES:
        return get(name)
    raise AttributeError(f"module 'sloth.config' has no attribute {name!r}")


__all__ = ["SWITCHES", "Switch", "get"]
