"""Page-locked host memory for offloaded checkpoints, in one exact-size region used as a stack.

torch's pinned-memory allocator rounds every block up to a power of two: 32 hidden states of 3.3 GB (400k tokens
x 4096 x bf16) take 32 x 4 GiB = 128 GiB of host memory instead of 105 GB. The checkpoints of a training step
are made in forward order and released in the reverse order in backward, so one region, sub-allocated as a stack,
holds them exactly. The region is plain host memory page-locked with ``cudaHostRegister`` (exact size). When a
step needs more than the region holds (the first step, a longer batch), each tensor that does not fit gets a
page-locked buffer of its own, also of exact size (the page-locking is paid only then), and the region grows
to the peak seen so far the next time nothing is alive in it (at the latest the next step's start), so from the
second step on all checkpoints live in it.

Opt-in (``SLOTH_PINNED_ARENA=1``; worth it past ~256k tokens, where the rounding costs tens of GiB of host
memory): :func:`arena` returns None otherwise.
"""

from __future__ import annotations

import threading
from typing import Callable, List, Optional, Tuple

import torch

from .. import config
from . import streams

#: Offsets are multiples of this (bytes): the DMA engines' preferred alignment, and any dtype's.
ALIGN = 512

_local = threading.local()


def _round_up(n: int, m: int = ALIGN) -> int:
    return -(-n // m) * m


def _cuda_pin(buf: torch.Tensor) -> Callable[[], None]:
    """Page-lock ``buf``'s memory for the GPU (cudaHostRegister); returns the function that undoes it.

    The undo first waits for the offload side streams, where every copy to or from the region runs: its last
    copies (the backward's host-to-device prefetches) may still be reading it when the arena is resized or
    released, and neither unregistering nor freeing memory under an in-flight DMA is allowed. A resize happens
    only when a step needed more than the region holds (the first steps), so this host sync is not paid in
    steady state."""
    cudart = torch.cuda.cudart()
    ptr, size = buf.data_ptr(), buf.numel()
    err = cudart.cudaHostRegister(ptr, size, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {size} bytes failed with CUDA error {int(err)}")

    def unpin() -> None:
        streams.synchronize(streams.OFFLOAD)  # the offload copies that may still read the region
        cudart.cudaHostUnregister(ptr)

    return unpin


class PinnedArena:
    """A stack of host tensors in one page-locked region: :meth:`alloc` -> (tensor, handle), :meth:`free` (handle).

    Frees may come in any order; a slot's bytes return to the stack once every slot above it is free too.
    ``pin`` page-locks a buffer and returns its undo (tests pass a no-op). A tensor that does not fit the region
    gets a page-locked buffer of its own, of its exact size (not torch's pinned allocator, whose power-of-two
    rounding would take 128 GiB for the 105 GB of a first step at 400k tokens), unpinned when it is freed.
    """

    def __init__(self, pin: Callable[[torch.Tensor], Callable[[], None]] = _cuda_pin):
        self._pin = pin
        self._buf: Optional[torch.Tensor] = None  # uint8 [capacity]
        self._unpin: Optional[Callable[[], None]] = None
        self._slots: List[list] = []  # [offset, nbytes, freed] in stack order
        self._top = 0  # bytes of the region in use (end of the topmost slot)
        self._in_use = 0  # bytes alive, region and overflow
        self._peak = 0  # most bytes alive at once since the region was last sized
        self.overflows = 0  # allocations that did not fit the region (for tests and reports)
        #: most bytes alive at once (region and overflow) since :meth:`reset_peak` (for reports: torch's pinned
        #: allocator statistics do not see this memory)
        self.peak_bytes = 0

    @property
    def capacity(self) -> int:
        return 0 if self._buf is None else self._buf.numel()

    def alloc(self, shape, dtype: torch.dtype) -> Tuple[torch.Tensor, object]:
        """An uninitialized host tensor of ``shape`` / ``dtype`` and the handle that frees it."""
        shape = tuple(shape)
        exact = torch.Size(shape).numel() * dtype.itemsize
        nbytes = _round_up(max(1, exact))
        if not self._slots and self._peak > self.capacity:
            self._resize(self._peak)
        if self._top + nbytes <= self.capacity:
            slot = [self._top, nbytes, False]
            self._slots.append(slot)
            self._top += nbytes
            self._count(nbytes)
            return self._buf[slot[0]:slot[0] + exact].view(dtype).view(shape), slot
        buf = torch.empty(nbytes, dtype=torch.uint8)
        unpin = self._pin(buf)  # (should it fail, nothing has been counted)
        self.overflows += 1
        self._count(nbytes)
        # an overflow's handle has its freed flag where a slot has it
        return buf[:exact].view(dtype).view(shape), ["overflow", nbytes, False, (unpin, buf)]

    def _count(self, nbytes: int) -> None:
        self._in_use += nbytes
        self._peak = max(self._peak, self._in_use)
        self.peak_bytes = max(self.peak_bytes, self._in_use)

    def reset_peak(self) -> None:
        """Restart :attr:`peak_bytes` from the bytes alive now (the region's sizing keeps its own peak)."""
        self.peak_bytes = self._in_use

    def free(self, handle) -> None:
        if handle[2]:
            raise RuntimeError("sloth: pinned arena slot freed twice")
        handle[2] = True
        self._in_use -= handle[1]
        if handle[0] == "overflow":  # a buffer of its own: unpinned (after its copies), then dropped
            unpin, _ = handle.pop()
            unpin()
            return
        while self._slots and self._slots[-1][2]:
            self._slots.pop()
        self._top = self._slots[-1][0] + self._slots[-1][1] if self._slots else 0

    def _resize(self, nbytes: int) -> None:
        self.release()
        buf = torch.empty(_round_up(nbytes, 1 << 20), dtype=torch.uint8)
        self._unpin = self._pin(buf)
        self._buf = buf

    def release(self) -> None:
        """Give the region back (nothing may be alive in it)."""
        if self._slots:
            raise RuntimeError("sloth: pinned arena released while checkpoints are alive in it")
        if self._unpin is not None:
            self._unpin()
        self._buf = self._unpin = None
        self._top = 0


def arena() -> Optional[PinnedArena]:
    """This thread's arena when ``SLOTH_PINNED_ARENA=1`` and CUDA is available, else None."""
    if not config.PINNED_ARENA or not torch.cuda.is_available():
        return None
    a = getattr(_local, "arena", None)
    if a is None:
        a = _local.arena = PinnedArena()
    return a
