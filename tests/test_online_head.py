"""The online frozen-head path of the linear cross-entropy / log-probs (sloth.nn._online_head, ops
ce_online_block / ce_online_finish) against sloth.reference.

Tolerances as in test_cross_entropy (see its docstring): fp32 -> summation order only (2e-5 loss, 5e-5 grad
rel-norm); fp16 / bf16 -> the kernel rounds p' = exp(z - m) dz/dx to the input dtype before the dh GEMM where the
reference rounds d logits once: one rounding per element (bf16 2^-9 relative), 1e-2 / 2e-3 rel-norm.
"""

from __future__ import annotations

import math

import pytest
import torch

import sloth
from sloth.nn import _online_head
from sloth.reference import cross_entropy as ref

from test_cross_entropy import DEVICES, TOL, make, rel_err


@pytest.fixture
def vocab_block(monkeypatch):
    """Set the online path's vocabulary block (small blocks: many blocks, tails, running-max moves)."""
    def set_block(vb):
        monkeypatch.setattr(_online_head, "VOCAB_BLOCK", vb)
    return set_block


def check_frozen(hidden, weight, bias, labels, *, chunk_size=None, **kw):
    """Loss and dh of sloth (frozen W and bias: the online path) vs the reference."""
    loss = sloth.linear_cross_entropy(hidden, weight, labels, bias=bias, chunk_size=chunk_size, **kw)
    want = ref.linear_cross_entropy(hidden, weight, labels, bias=bias, **kw)
    ltol, gtol = TOL[hidden.dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, want.float(), rtol=ltol, atol=ltol)
    got = torch.autograd.grad(loss, hidden)[0]
    exp = torch.autograd.grad(want, hidden)[0]
    assert got.dtype == exp.dtype and got.shape == exp.shape
    assert rel_err(got, exp) < gtol or (exp.abs().max() == 0 and got.abs().max() == 0)


SHAPES = [(n, v, h) for n, v, h in ((1, 1, 8), (1, 17, 64), (7, 1000, 100), (300, 1003, 64), (37, 32003, 8),
                                     (129, 257, 96))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,v,h", SHAPES)
@pytest.mark.parametrize("vb", [7, 64, 4096])
def test_shapes_fp32(device, n, v, h, vb, vocab_block):
    vocab_block(vb)
    hidden, weight, bias, labels = make(n, h, v, torch.float32, device, bias=n % 2 == 1, w_grad=False,
                                        ignore_every=5)
    if bias is not None:
        bias.requires_grad_(False)
    check_frozen(hidden, weight, bias, labels, chunk_size=64 if n > 64 else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feature", ["plain", "softcap", "logit_scale", "bias", "sum", "num_items"])
def test_features(device, dtype, feature, vocab_block):
    vocab_block(96)  # 1003 = 10 blocks of 96 + a tail of 43
    hidden, weight, bias, labels = make(61, 64, 1003, dtype, device, bias=feature == "bias", w_grad=False,
                                        ignore_every=4)
    if bias is not None:
        bias.requires_grad_(False)
    kw = {"softcap": dict(softcap=7.0), "logit_scale": dict(logit_scale=0.37), "sum": dict(reduction="sum"),
          "num_items": dict(num_items_in_batch=123)}.get(feature, {})
    check_frozen(hidden, weight, bias, labels, chunk_size=13, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_running_max_moves_late(device, dtype, vocab_block):
    """A bias rising along the vocabulary puts each row's max in its last block, 30+ above the first block's:
    the reference max moves (acc and s rescaled) several times per row, past the margin."""
    vocab_block(50)
    hidden, weight, _, labels = make(40, 32, 401, dtype, device, w_grad=False)
    bias = torch.linspace(0.0, 40.0, 401).to(device, dtype)
    labels[::3] = 400  # the label in the last block too
    check_frozen(hidden, weight, bias, labels, chunk_size=16)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_logits(device, vocab_block):
    """-inf bias entries (masked tokens), a whole first block masked included, contribute nothing."""
    vocab_block(16)
    hidden, weight, _, labels = make(20, 16, 100, torch.float32, device, w_grad=False)
    bias = torch.zeros(100, device=device)
    bias[:16] = -float("inf")
    bias[40:45] = -float("inf")
    labels = labels.clamp_min(50)
    check_frozen(hidden, weight, bias, labels)


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_rows(device, vocab_block):
    vocab_block(10)
    hidden, weight, _, labels = make(30, 16, 101, torch.float32, device, w_grad=False)
    labels[:10] = -100
    check_frozen(hidden, weight, None, labels, chunk_size=10)
    labels[:] = -100
    loss = sloth.linear_cross_entropy(hidden, weight, labels, chunk_size=10)
    assert loss.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(loss, hidden)[0]) == 0
    labels[:] = 7  # a custom ignore index inside the vocabulary
    loss = sloth.linear_cross_entropy(hidden, weight, labels, ignore_index=7)
    assert loss.item() == 0.0


def test_out_of_range_label_is_an_error():
    hidden, weight, _, labels = make(5, 8, 10, torch.float32, "cpu", w_grad=False)
    labels[2] = 10
    with pytest.raises(ValueError, match="outside"):  # (NaN-poisoned gradients: test_cross_entropy.py)
        sloth.linear_cross_entropy(hidden, weight, labels)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulation_equals_full_batch(device):
    hidden, weight, _, labels = make(80, 32, 333, torch.float32, device, w_grad=False, ignore_every=3)
    total = int((labels != -100).sum())
    full = sloth.linear_cross_entropy(hidden, weight, labels)
    full_dh = torch.autograd.grad(full, hidden)[0]
    acc_loss, acc_dh = 0.0, torch.zeros_like(hidden)
    for part in torch.arange(80, device=device).chunk(4):
        loss = sloth.linear_cross_entropy(hidden[part], weight, labels[part], num_items_in_batch=total, chunk_size=7)
        acc_loss, acc_dh = acc_loss + loss, acc_dh + torch.autograd.grad(loss, hidden)[0]
    torch.testing.assert_close(acc_loss, full, rtol=1e-5, atol=1e-6)
    assert rel_err(acc_dh, full_dh) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_backward(device, dtype, vocab_block):
    """linear_logprobs' backward (frozen W, no entropy gradient) takes the online path, per-token upstream grads."""
    vocab_block(128)
    hidden, weight, b, tokens = make(45, 32, 1001, dtype, device, bias=True, w_grad=False)
    b.requires_grad_(False)
    tokens[::7] = -100
    lp = sloth.linear_logprobs(hidden, weight, tokens, bias=b, temperature=0.8, chunk_size=16)
    lp2 = ref.linear_logprobs(hidden, weight, tokens.clamp_min(0), bias=b, temperature=0.8)
    lp2 = torch.where(tokens == -100, 0.0, lp2)
    gl = torch.randn(45, device=device)
    dh = torch.autograd.grad((lp * gl).sum(), hidden)[0]
    dh2 = torch.autograd.grad((lp2 * gl).sum(), hidden)[0]
    assert rel_err(dh, dh2) < (1e-4 if dtype == torch.float32 else 2e-2)


def _blocks(device, dtype, rows=9, v=37, h=12, vb=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, v, generator=g) * 4).to(device, dtype)  # raw logits of the whole row
    # labels in the first, second, third and last block, and ignored rows
    labels = torch.tensor([0, 5, -100, v - 1, (vb + 1) % v, 2, v - 7, -100, (2 * vb + 3) % v][:rows], device=device)
    w = torch.randn(v, h, generator=g).to(device, dtype)
    return x, labels, w, vb


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("margin", [0.0, 8.0])
# (vocabulary, block): the CUDA kernel's scalar (10) and 8-wide paths (2056 to 16392: one or several 8-wide
# accesses per thread per pass, the last one partial), each with a tail block
@pytest.mark.parametrize("v,vb", [(37, 10), (4115, 2056), (16390, 8192), (16405, 8200), (32790, 16392)])
def test_raw_ops_against_reference(device, dtype, margin, v, vb):
    """Block by block, ce_online_block's p' / state / acc rescale and ce_online_finish's loss / dh match
    sloth.reference's online_block / online_finish, and the final loss / dh match the closed form."""
    x, labels, w, vb = _blocks(device, dtype, v=v, vb=vb)
    rows, v = x.shape
    h = w.shape[1]
    softcap, scale = 6.0, 0.7
    state = torch.empty(rows, 4, device=device)
    acc = torch.empty(rows, h, device=device)
    r_state, r_acc = torch.zeros(rows, 4), torch.zeros(rows, h)
    for v0 in range(0, v, vb):
        blk = x[:, v0:v0 + vb].contiguous()
        p_want, r_state, r_acc = ref.online_block(blk, labels, v0, r_state, r_acc, softcap, scale, margin)
        sloth.ops.ce_online_block_(blk, labels, v0, state, acc, softcap=softcap, logit_scale=scale, margin=margin)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(blk.float().cpu(), p_want.float().cpu(), rtol=tol, atol=tol)
        torch.testing.assert_close(state.cpu(), r_state.cpu(), rtol=1e-5, atol=1e-5)
        if v0 > 0:
            torch.testing.assert_close(acc.cpu(), r_acc.cpu(), rtol=1e-5, atol=1e-5)
        upd = blk.float() @ w[v0:v0 + vb].float()
        acc = upd if v0 == 0 else acc + upd
        r_acc = acc.cpu().clone()
    scale_rows = torch.randn(rows, device=device)
    dh = torch.empty(rows, h, device=device, dtype=dtype)
    loss = sloth.ops.ce_online_finish(state, acc, w, labels, -100, dh, row_scale=scale_rows)
    loss_want, dh_want = ref.online_finish(state, acc, w, labels, scale_rows, -100)
    torch.testing.assert_close(loss, loss_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.float(), dh_want.float(), rtol=1e-2, atol=1e-2)
    # closed form: loss = lse(z) - z_label, d loss / d h = scale_rows * (softmax(z) dz/dx - onehot dz/dx) W
    z = softcap * torch.tanh(x.double().cpu() * scale / softcap)
    dz = scale * (1 - (z / softcap) ** 2)
    p = torch.softmax(z, -1)
    valid = labels.cpu() != -100
    lab = labels.cpu().clamp_min(0)
    want_loss = torch.where(valid, torch.logsumexp(z, -1) - z.gather(1, lab[:, None])[:, 0], 0.0)
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=1e-4, atol=1e-4)
    g = p * dz
    g[torch.arange(rows), lab] -= dz[torch.arange(rows), lab]
    want_dh = (g @ w.double().cpu()) * (scale_rows.double().cpu() * valid)[:, None]
    assert rel_err(dh.cpu(), want_dh) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_op_argument_errors():
    x, labels, w, vb = _blocks("cpu", torch.float32)
    rows, h = x.shape[0], w.shape[1]
    state, acc = torch.zeros(rows, 4), torch.zeros(rows, h)
    with pytest.raises(ValueError, match="state"):
        sloth.ops.ce_online_block_(x, labels, 0, state[:3], acc)
    with pytest.raises(TypeError, match="int64"):
        sloth.ops.ce_online_block_(x, labels.int(), 0, state, acc)
    with pytest.raises(TypeError, match="float32"):
        sloth.ops.ce_online_block_(x, labels, 0, state, acc.double())
    with pytest.raises(ValueError, match="contiguous"):
        sloth.ops.ce_online_block_(x.t().contiguous().t(), labels, 0, state, acc)
    with pytest.raises(TypeError, match="dh"):
        sloth.ops.ce_online_finish(state, acc, w, labels, -100, torch.empty(rows, h, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="row_scale"):
        sloth.ops.ce_online_finish(state, acc, w, labels, -100, torch.empty(rows, h), row_scale=torch.ones(3))


def test_online_chunk_rows():
    from sloth.nn._chunking import chunk_rows

    cpu = torch.device("cpu")
    assert chunk_rows(8192, 128256, torch.bfloat16, cpu, online_hidden=4096) == 1024
    assert chunk_rows(300, 128256, torch.bfloat16, cpu, online_hidden=4096) == 300
    assert chunk_rows(8192, 128256, torch.bfloat16, cpu, online_hidden=4096, chunk_size=5) == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_extra_memory_is_dh_plus_one_block():
    """Peak memory above the inputs: dh, the fp32 accumulator and one block of logits (+ small vectors)."""
    n, v, h = 4096, 50000, 1024
    hidden, weight, _, labels = make(n, h, v, torch.bfloat16, "cuda", w_grad=False)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = sloth.linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    rows = 1024
    bound = n * h * 2 + rows * h * 4 + rows * _online_head.VOCAB_BLOCK * 2 + n * 64 + (4 << 20)
    assert extra <= bound, (extra, bound)
    assert math.isfinite(loss.item())


def test_frozen_head_takes_the_online_path(monkeypatch):
    """A frozen W (dh only) runs online_head_grad; a trainable W runs the materialized chunks."""
    import sys

    mod = sys.modules["sloth.nn.linear_cross_entropy"]
    calls = []
    real = mod.online_head_grad
    monkeypatch.setattr(mod, "online_head_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    hidden, weight, _, labels = make(10, 8, 30, torch.float32, "cpu", w_grad=False)
    sloth.linear_cross_entropy(hidden, weight, labels).backward()
    assert calls == [1]
    sloth.linear_cross_entropy(hidden, weight.requires_grad_(), labels).backward()
    assert calls == [1]
