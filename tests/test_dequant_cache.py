"""DequantCache: the backward right after a forward of the same NF4 weight reuses its dequantized copy; stale,
over-budget and evicted entries are never used."""

from __future__ import annotations

import pytest
import torch

import sloth
from sloth.nn.workspace import DequantCache
from sloth.ops.qlora import NF4Args

from test_lora_linear import make_weight


@pytest.fixture
def count_dequant(monkeypatch):
    DequantCache.clear()
    calls = []
    real = NF4Args.dequantize_into
    monkeypatch.setattr(NF4Args, "dequantize_into", lambda self, buf: calls.append(1) or real(self, buf))
    yield calls
    DequantCache.clear()


def _lora(in_f=128, out_f=64, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(r, in_f, generator=g) * 0.1).requires_grad_()
    B = (torch.randn(out_f, r, generator=g) * 0.1).requires_grad_()
    return A, B


def test_backward_reuses_the_forward_copy(count_dequant):
    W, qs = make_weight("nf4", 64, 128, torch.float32)
    A, B = _lora()
    x = torch.randn(16, 128, requires_grad=True)
    y = sloth.lora_linear(x, W, A, B, 0.5, quant_state=qs)
    assert len(count_dequant) == 1
    y.square().sum().backward()
    assert len(count_dequant) == 1  # dx used the cached copy
    # the same gradient as with a workspace dequantization (cleared cache, x without grad -> no keep)
    g1 = x.grad.clone()
    DequantCache.clear()
    x.grad = None
    sloth.lora_linear(x, W, A, B, 0.5, quant_state=qs).square().sum().backward()
    assert len(count_dequant) == 2  # forward only, again
    torch.testing.assert_close(x.grad, g1, rtol=0, atol=0)


def test_no_graph_no_entry(count_dequant):
    W, qs = make_weight("nf4", 64, 128, torch.float32)
    x = torch.randn(16, 128)  # no grad: no backward will come
    sloth.lora_linear(x, W, None, None, quant_state=qs)
    assert DequantCache.nbytes() == 0
    with torch.no_grad():
        sloth.lora_linear(x.requires_grad_(), W, None, None, quant_state=qs)
    assert DequantCache.nbytes() == 0


def test_other_owner_misses():
    DequantCache.clear()

    class Owner:
        pass

    a, b = Owner(), Owner()
    buf = DequantCache.insert("k", a, 10, torch.float32, "cpu")
    assert DequantCache.lookup("k", a) is buf
    assert DequantCache.lookup("k", b) is None  # e.g. a new quant state where a freed one lived
    assert DequantCache.lookup("k", a) is None  # and the stale entry is gone
    DequantCache.clear()


def test_budget_and_lru(monkeypatch):
    DequantCache.clear()
    monkeypatch.setattr(DequantCache, "budget_bytes", 100 * 4)

    class Owner:
        pass

    o = Owner()
    assert DequantCache.insert("big", o, 101, torch.float32, "cpu") is None
    b1 = DequantCache.insert(1, o, 50, torch.float32, "cpu")
    DequantCache.insert(2, o, 50, torch.float32, "cpu")
    assert DequantCache.lookup(1, o) is b1  # 1 is now the most recent
    b3 = DequantCache.insert(3, o, 50, torch.float32, "cpu")  # evicts 2 and reuses its buffer
    assert DequantCache.lookup(2, o) is None and DequantCache.lookup(1, o) is b1 and DequantCache.lookup(3, o) is b3
    assert DequantCache.nbytes() == 400
    DequantCache.clear()


def test_mlp_backward_after_recompute(count_dequant, monkeypatch):
    """Two checkpointed LoRA MLPs, a cache that holds one MLP's three weights: each backward dequantizes
    nothing after its recompute (18 dequantizations without the cache: forward, recompute, backward)."""
    from torch.utils.checkpoint import checkpoint

    from sloth.nn.lora_mlp import LoraProj, lora_mlp

    monkeypatch.setattr(DequantCache, "budget_bytes", 3 * 96 * 64 * 4)
    blocks = []
    for b in range(2):
        projs = []
        for i, (o, n) in enumerate(((96, 64), (96, 64), (64, 96))):
            W, qs = make_weight("nf4", o, n, torch.float32, seed=10 * b + i)
            A, B = _lora(n, o, seed=i)
            projs.append(LoraProj(W, A, B, 0.5, None, qs))
        blocks.append(projs)
    x = torch.randn(8, 64, requires_grad=True)
    y = x
    for projs in blocks:
        y = checkpoint(lambda t, p=projs: lora_mlp(t, *p), y, use_reentrant=False)
    assert len(count_dequant) == 6
    y.sum().backward()
    # block 2: recompute and backward hit; block 1: recompute dequantizes 3, its backward hits
    assert len(count_dequant) == 9
