"""Offloaded activation checkpointing (sloth.offloaded_checkpoint, use_gradient_checkpointing="sloth"): gradients
equal those without checkpointing (tiny Llama / Gemma 3 / Qwen3, CPU, fp32), with dropout, autocast, LoRA on a
frozen base, extra tensor arguments and captured tensors; the CUDA offload path (copies to pinned host memory and
prefetch) under the `cuda` marker."""

import copy
import functools

import pytest
import torch

import sloth
from sloth.runtime import offload_checkpoint as oc

transformers = pytest.importorskip("transformers")

from test_transformers_integration import make_batch, make_model  # noqa: E402


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def count_recomputes(monkeypatch):
    """How many times the offloaded checkpoint's backward ran (so a test cannot pass with checkpointing off)."""
    calls = []
    backward = oc.OffloadedCheckpointFunction.backward

    def counting(ctx, *g):
        calls.append(1)
        return backward(ctx, *g)

    monkeypatch.setattr(oc.OffloadedCheckpointFunction, "backward", staticmethod(counting))
    return calls


def loss_and_grads(model, seed=7, device="cpu", autocast=None):
    ids, mask, labels = (t.to(device) for t in make_batch())
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()  # outside autocast, as recommended: the recompute must restore the forward's autocast state
    return loss.detach(), grads(model)


@pytest.fixture
def count_down_products(monkeypatch):
    """How many down-projection products ([tokens, intermediate] x [intermediate, hidden]) sloth computed."""
    import importlib

    ll = importlib.import_module("sloth.nn.lora_linear")  # the module (sloth.nn.lora_linear is also the function)
    calls = []
    real = ll._forward

    def counting(x2d, w, *a, **k):
        if w.shape[0] < w.shape[1]:  # [hidden, intermediate]: the down projection (hidden < intermediate here)
            calls.append(x2d.shape[0])
        return real(x2d, w, *a, **k)

    monkeypatch.setattr(ll, "_forward", counting)
    return calls


class HostStandIn:
    """offload_checkpoint._HostCopy without CUDA: keeps clones of the tensors (the bookkeeping is what is tested)."""

    made = 0  # instances created

    def __init__(self, tensors, prev, accounted=(0, 0)):
        self.tensors, self.accounted = [t.clone() for t in tensors], accounted
        HostStandIn.made += 1

    def prefetch(self):
        pass

    def fetch(self):
        oc._release_host(*self.accounted)
        tensors, self.tensors = self.tensors, None
        return tensors

    def previous(self):
        return None


def test_host_limit_keeps_further_inputs_on_the_device(monkeypatch, caplog):
    """When the pinned copies would exceed the host limit (SLOTH_OFFLOAD_HOST_GB), the inputs of further layers
    stay where they are (one warning); gradients are unchanged and the accounting returns to zero. Run on the CPU
    with a stand-in for the pinned copies."""
    monkeypatch.setattr(oc, "_offloads", lambda t: True)
    monkeypatch.setattr(oc, "_HostCopy", HostStandIn)
    monkeypatch.setattr(oc, "_warned", [])
    monkeypatch.setattr(HostStandIn, "made", 0)
    ref = sloth.patch(make_model("llama")).train()
    model = copy.deepcopy(ref)
    sloth.set_gradient_checkpointing(model, "sloth")
    _, g_ref = loss_and_grads(ref)
    hidden = 4 * 12 * 64 * 4  # [batch, tokens, hidden] fp32, bytes: a power of two's worth of pinned memory
    monkeypatch.setenv("SLOTH_OFFLOAD_HOST_GB", str(1.5 * hidden / 2**30))  # room for one of the two layers
    with caplog.at_level("WARNING", logger="sloth"):
        _, g = loss_and_grads(model)
    assert HostStandIn.made == 1
    assert sum("stay on the GPU" in r.getMessage() for r in caplog.records) == 1
    assert oc._host == {"live": 0, "attention": 0}
    for n in g:
        assert rel_err(g[n], g_ref[n]) <= 1e-6, n


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3", "mistral"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_grads_equal_no_checkpointing(family, dropout, count_recomputes, count_down_products):
    ref = make_model(family)
    for layer in ref.model.layers:
        layer.self_attn.attention_dropout = dropout  # dropout: the recompute must draw the same masks
    ref = sloth.patch(ref).train()
    model = copy.deepcopy(ref)
    sloth.set_gradient_checkpointing(model, "sloth")
    loss_ref, g_ref = loss_and_grads(ref)
    layers = model.config.num_hidden_layers
    assert len(count_down_products) == layers
    count_down_products.clear()
    loss, g = loss_and_grads(model)
    assert len(count_recomputes) == layers
    # the recompute skips the down product where only the residual sum reads it (not Gemma 3's post-MLP norm)
    assert len(count_down_products) == layers * (2 if family == "gemma3" else 1)
    assert torch.equal(loss, loss_ref)
    assert g.keys() == g_ref.keys() and len(g) == len(list(model.parameters()))
    for n in g:
        assert rel_err(g[n], g_ref[n]) <= 1e-6, n
    if dropout:  # a different seed gives different gradients: the test sees the RNG
        _, g_other = loss_and_grads(model, seed=8)
        assert any(rel_err(g_other[n], g[n]) > 1e-3 for n in g)


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # 0: sloth's MLP path (down product skipped in the recompute)
def test_lora_frozen_base_grads_equal(dropout, count_recomputes, count_down_products):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = make_model("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
    ref = sloth.patch(peft.get_peft_model(copy.deepcopy(base), cfg)).train()
    model = copy.deepcopy(ref)
    sloth.set_gradient_checkpointing(model, "sloth")
    _, g_ref = loss_and_grads(ref)
    count_down_products.clear()
    _, g = loss_and_grads(model)
    assert len(count_recomputes) == 2
    if dropout == 0:  # the two layers' forwards only (with LoRA dropout the MLP is PEFT's, recomputed in full)
        assert len(count_down_products) == 2
    assert g.keys() == g_ref.keys() and len(g) == 2 * len(targets) * 2
    for n in g:
        assert rel_err(g[n], g_ref[n]) <= 1e-6, n


def test_cpu_autocast_recompute_in_same_precision():
    ref = sloth.patch(make_model("llama")).train()
    model = copy.deepcopy(ref)
    sloth.set_gradient_checkpointing(model, "sloth")
    loss_ref, g_ref = loss_and_grads(ref, autocast=torch.bfloat16)
    loss, g = loss_and_grads(model, autocast=torch.bfloat16)
    assert torch.equal(loss, loss_ref)
    for n in g:
        assert rel_err(g[n], g_ref[n]) <= 1e-6, n


def _block(lin, x, mask, *, scale, extra=None):
    y = torch.tanh(lin(x)) * scale * mask.unsqueeze(-1)
    if extra is not None:
        y = y + extra
    return y, None, "meta"  # non-tensor outputs pass through


def test_function_level_semantics():
    lin = torch.nn.Linear(8, 8)
    x0 = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 0, 1, 0]] * 3)

    def run(checkpointed, x_requires_grad, extra=None):
        lin.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(x_requires_grad)
        fn = functools.partial(_block, lin, scale=0.5, extra=extra)
        out = oc.offloaded_checkpoint(fn, x, mask) if checkpointed else fn(x, mask)
        assert out[1] is None and out[2] == "meta"
        out[0].square().sum().backward()
        return out[0].detach(), lin.weight.grad.clone(), x.grad

    # the input does not require grad (frozen embeddings): the parameters still get their gradients
    y, gw, gx = run(True, False)
    y_ref, gw_ref, _ = run(False, False)
    assert gx is None and torch.equal(y, y_ref) and rel_err(gw, gw_ref) <= 1e-6
    y, gw, gx = run(True, True)
    _, gw_ref, gx_ref = run(False, True)
    assert rel_err(gw, gw_ref) <= 1e-6 and rel_err(gx, gx_ref) <= 1e-6
    # a captured tensor that requires grad: falls back to PyTorch's checkpoint, its gradient is right
    extra = torch.randn(3, 5, 8, requires_grad=True)
    run(True, True, extra)
    g_extra = extra.grad.clone()
    extra.grad = None
    run(False, True, extra)
    assert rel_err(g_extra, extra.grad) <= 1e-6
    # no grad mode: a plain call, no graph
    with torch.no_grad():
        out = oc.offloaded_checkpoint(functools.partial(_block, lin, scale=0.5), x0, mask)
    assert out[0].grad_fn is None


def test_kwargs_and_extra_tensor_args():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)  # a second tensor argument that requires grad

    def f(h, b, *, scale):
        return torch.relu(lin(h) + b) * scale

    oc.offloaded_checkpoint(f, x, bias, scale=2.0).sum().backward()
    gx, gb, gw = x.grad.clone(), bias.grad.clone(), lin.weight.grad.clone()
    x.grad = bias.grad = lin.weight.grad = None
    f(x, bias, scale=2.0).sum().backward()
    assert rel_err(gx, x.grad) <= 1e-6 and rel_err(gb, bias.grad) <= 1e-6 and rel_err(gw, lin.weight.grad) <= 1e-6


def test_transformers_mode_true_and_false_keep_grads():
    ref = sloth.patch(make_model("mistral")).train()
    _, g_ref = loss_and_grads(ref)
    for mode in (True, False):
        model = copy.deepcopy(ref)
        sloth.set_gradient_checkpointing(model, mode)
        assert all(layer.gradient_checkpointing == bool(mode) for layer in model.model.layers)
        _, g = loss_and_grads(model)
        for n in g:
            assert rel_err(g[n], g_ref[n]) <= 1e-6, n


@pytest.mark.cuda
def test_cuda_offload_grads_and_memory():
    """On the GPU: gradients equal the non-checkpointed ones, each layer's input lives in pinned host memory between
    forward and backward (device memory held by the graph is about one hidden state, not one per layer)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=512, vocab_size=256, max_position_embeddings=2048,
                                   tie_word_embeddings=False)
    cfg._attn_implementation = "eager"  # deterministic backward (SDPA's fp32 kernels may accumulate atomically)
    ref = sloth.patch(transformers.LlamaForCausalLM(cfg).cuda().float()).train()
    model = copy.deepcopy(ref)
    sloth.set_gradient_checkpointing(model, "sloth")
    ids = torch.randint(0, 256, (4, 1024), device="cuda")
    grads_of = []
    for m in (ref, model):
        torch.manual_seed(3)
        m.zero_grad(set_to_none=True)
        m(input_ids=ids, labels=ids).loss.backward()
        grads_of.append(grads(m))
    torch.cuda.synchronize()
    for n in grads_of[0]:
        assert rel_err(grads_of[1][n], grads_of[0][n]) <= 1e-5, n
    # what the graph holds after the forward: offloaded < plain checkpointing (one hidden state per layer). "sloth"
    # runs twice, the second time measured: its first run captures the layers' CUDA graphs, whose static buffers
    # (one set for all layers) stay allocated from then on.
    hidden_bytes = 4 * 1024 * 256 * 4
    held = {}
    for mode in (True, "sloth", "sloth"):
        sloth.set_gradient_checkpointing(model, mode)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(input_ids=ids, labels=ids)
        torch.cuda.synchronize()
        held[mode] = torch.cuda.memory_allocated() - before
        out.loss.backward()
        del out
    assert held[True] - held["sloth"] >= (cfg.num_hidden_layers - 2) * hidden_bytes, held


@pytest.mark.cuda
def test_cuda_offload_into_the_pinned_arena(monkeypatch):
    """SLOTH_PINNED_ARENA=1: three steps give the same gradients as plain checkpointing, and the third step fits the
    region the first two sized (no overflow, no growth)."""
    from sloth.runtime import pinned_arena

    monkeypatch.setenv("SLOTH_PINNED_ARENA", "1")
    monkeypatch.setattr(pinned_arena, "_local", __import__("threading").local())  # a fresh arena
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=256, vocab_size=256, max_position_embeddings=1024,
                                   tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    ref = sloth.patch(transformers.LlamaForCausalLM(cfg).cuda().float()).train()
    model = copy.deepcopy(ref)
    sloth.set_gradient_checkpointing(model, "sloth")
    ids = torch.randint(0, 256, (2, 512), device="cuda")
    torch.manual_seed(3)
    ref(input_ids=ids, labels=ids).loss.backward()
    want = grads(ref)
    arena = pinned_arena.arena()
    for step in range(3):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        got = grads(model)
        for n in want:
            assert rel_err(got[n], want[n]) <= 1e-5, (step, n)
        if step == 1:  # the first step sizes the region (its overflows come from torch's pinned allocator)
            overflows, capacity = arena.overflows, arena.capacity
    assert arena.overflows == overflows and arena.capacity == capacity
    assert capacity >= cfg.num_hidden_layers * 2 * 512 * 128 * 4
    assert not arena._slots  # every slot was returned
