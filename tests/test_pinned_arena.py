"""PinnedArena's bookkeeping (CPU: page-locking replaced by a no-op; the CUDA path runs in
test_offload_checkpoint on a GPU with SLOTH_PINNED_ARENA=1)."""

from __future__ import annotations

import pytest
import torch

from sloth.runtime.pinned_arena import ALIGN, PinnedArena


def make_arena():
    pinned = []

    def pin(buf):
        pinned.append(buf.numel())
        return lambda: pinned.remove(buf.numel())

    return PinnedArena(pin=pin), pinned


def _span(t):
    start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
    return start, start + t.numel() * t.element_size()


def one_step(a, shapes, order=None):
    """Allocate in forward order, write a distinct value into each, check them, free in ``order`` (default LIFO)."""
    got = [a.alloc(s, torch.bfloat16) for s in shapes]
    for i, (t, _) in enumerate(got):
        assert t.shape == tuple(shapes[i]) and t.dtype == torch.bfloat16
        t.fill_(i)
    for i, (t, _) in enumerate(got):
        assert torch.all(t == i)  # no two views overlap
    order = order or list(range(len(got)))[::-1]
    for i in order:
        a.free(got[i][1])
    return got


def test_first_step_overflows_then_fits_exactly():
    a, pinned = make_arena()
    shapes = [(600_000,), (7, 33), (1_000_000,), (2, 2, 2)]  # bf16: 1.2 MB, 462 B, 2 MB, 16 B
    one_step(a, shapes)
    first = a.overflows
    assert first >= 1  # the region is sized from what it has seen: some of the first step overflows
    one_step(a, shapes)
    one_step(a, shapes)
    assert a.overflows == first  # from the second step on everything fits
    need = sum(-(-(torch.Size(s).numel() * 2) // ALIGN) * ALIGN for s in shapes)
    assert need <= a.capacity < need + (1 << 20) and pinned == [a.capacity]  # exact up to 1 MiB rounding
    views = one_step(a, shapes)
    starts = [_span(t)[0] for t, _ in views]
    assert all((x - starts[0]) % ALIGN == 0 for x in starts)


def test_overflow_is_pinned_at_its_exact_size_until_freed():
    """What does not fit the region gets a page-locked buffer of its own, of the tensor's size rounded to ALIGN (not
    torch's pinned allocator: a power of two, 4 GiB for the 3.3 GB input of a layer at 400k tokens), unpinned when
    freed."""
    a, pinned = make_arena()
    one_step(a, [(10,)])  # the empty region: an overflow, then the region is sized (1 MiB: rounded to MiB)
    small, hs = a.alloc((10,), torch.bfloat16)
    assert a.overflows == 1 and pinned == [1 << 20]
    big, hb = a.alloc((1_000_000,), torch.bfloat16)  # 2 MB, with a slot alive: an overflow
    exact = -(-2_000_000 // ALIGN) * ALIGN
    assert a.overflows == 2 and pinned == [1 << 20, exact]
    small.fill_(1)
    big.fill_(2)
    assert torch.all(small == 1) and torch.all(big == 2)  # separate memory
    a.free(hb)
    assert pinned == [1 << 20]
    with pytest.raises(RuntimeError, match="twice"):
        a.free(hb)
    a.free(hs)
    assert a._in_use == 0 and not a._slots


def test_a_failed_overflow_pin_counts_nothing():
    """cudaHostRegister may fail (the host's locked-memory limit): the error reaches the caller and the arena's
    bookkeeping is as before the call, so the region is not later sized for bytes that never existed."""
    def pin(buf):
        raise RuntimeError("cudaHostRegister failed")

    a = PinnedArena(pin=pin)
    with pytest.raises(RuntimeError, match="cudaHostRegister"):
        a.alloc((1000,), torch.bfloat16)
    assert a.overflows == 0 and a._in_use == 0 and a._peak == 0 and not a._slots


def test_peak_bytes_counts_region_and_overflow_until_reset():
    """peak_bytes (what reports read: torch's pinned-memory statistics do not see the arena) is the most bytes alive
    at once, in the region and in overflows; reset_peak restarts it from what is alive, without changing how the
    region is next sized."""
    a, _ = make_arena()
    one_step(a, [(1024,), (512,)])  # first step: 2048 + 1024 bytes alive at once, the first in an overflow
    first = a.overflows
    assert first >= 1 and a.peak_bytes == 3072
    a.reset_peak()
    assert a.peak_bytes == 0
    t, h = a.alloc((256,), torch.bfloat16)  # the region (sized 3072 B at least, from the first step's peak)
    assert a.overflows == first and a.capacity >= 3072 and a.peak_bytes == 512
    a.reset_peak()
    assert a.peak_bytes == 512  # still alive
    a.free(h)
    one_step(a, [(1024,), (512,)])
    assert a.peak_bytes == 3072 and a.overflows == first


def test_out_of_order_frees_reclaim_once_the_top_is_free():
    a, _ = make_arena()
    shapes = [(1024,)] * 4
    one_step(a, shapes)  # sizes the region
    got = [a.alloc(s, torch.bfloat16) for s in shapes]
    a.free(got[1][1])
    a.free(got[2][1])
    assert a._top == 4 * 2048  # slot 3 still alive: nothing reclaimed
    a.free(got[3][1])
    assert a._top == 2048  # slots 3, 2, 1 reclaimed
    t, h = a.alloc((1024,), torch.bfloat16)  # reuses slot 1's bytes
    assert _span(t)[0] == _span(got[1][0])[0]
    a.free(h)
    a.free(got[0][1])
    assert a._top == 0 and not a._slots


def test_grows_at_a_step_boundary_and_releases():
    a, pinned = make_arena()
    one_step(a, [(1000,)])
    one_step(a, [(1000,)])
    small = a.capacity
    one_step(a, [(1000,), (1 << 20,)])  # a longer step: its second tensor (2 MiB) overflows
    assert a.overflows == 2
    one_step(a, [(1000,), (1 << 20,)])
    assert a.overflows == 2
    assert a.capacity > small and len(pinned) == 1  # the old region was unpinned
    a.release()
    assert a.capacity == 0 and pinned == []


def test_double_free_and_release_while_alive_are_errors():
    a, _ = make_arena()
    one_step(a, [(10,)])
    t, h = a.alloc((10,), torch.float32)
    with pytest.raises(RuntimeError, match="released while"):
        a.release()
    a.free(h)
    with pytest.raises(RuntimeError, match="twice"):
        a.free(h)


def test_off_by_default(monkeypatch):
    from sloth.runtime import pinned_arena

    monkeypatch.delenv("SLOTH_PINNED_ARENA", raising=False)
    assert pinned_arena.arena() is None
