"""CUDA graphs of checkpointed layers' no-grad forwards (sloth.runtime.layer_graphs): what a capture depends on is seen
on the CPU (one signature for every decoder layer, a state that changes with adapters, weights, hooks and dropout);
on a GPU, training steps with graphs equal those without, and a changed adapter / weight / shape is followed."""

import copy

import pytest
import torch

import sloth
from sloth.runtime import layer_graphs as lg
from sloth.runtime import offload_checkpoint as oc

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_transformers_integration import _lora, make_batch, make_model  # noqa: E402


@pytest.fixture
def layer_calls(monkeypatch):
    """(layer, template, tensors, signature key) of every offloaded checkpoint's forward, as graphed_call sees them."""
    calls = []
    forward = oc.OffloadedCheckpointFunction.forward

    def spy(ctx, run, hidden_index, anchor, *args):
        calls.append(lg._layer_call(run, args))
        return forward(ctx, run, hidden_index, anchor, *args)

    monkeypatch.setattr(oc.OffloadedCheckpointFunction, "forward", staticmethod(spy))
    return calls


def lora_model(family="llama", dropout=0.0):
    model = sloth.patch(_lora(make_model(family), dropout))
    sloth.set_gradient_checkpointing(model, "sloth")
    return model.train()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_one_signature_for_every_layer(family, layer_calls):
    model = lora_model(family)
    ids, mask, labels = make_batch()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    layers = list(model.base_model.model.model.layers)
    assert [c[0] for c in layer_calls] == layers
    hidden = layer_calls[0][2][-1]
    assert hidden.shape == (ids.shape[0], ids.shape[1], model.config.hidden_size)  # the hidden state is a tensor arg
    if family == "llama":  # every layer alike: one set of static buffers and one pool serve them all
        assert len({c[3] for c in layer_calls}) == 1
    ids2, mask2, labels2 = (t[:, :-2] for t in (ids, mask, labels))
    model(input_ids=ids2, attention_mask=mask2, labels=labels2).loss.backward()
    assert layer_calls[-1][3] != layer_calls[len(layers) - 1][3]  # another length: another signature


def test_state_follows_what_a_capture_freezes():
    model = lora_model()
    layer = model.base_model.model.model.layers[0]
    s0 = lg._layer_state(layer)
    assert lg._layer_state(layer) == s0
    q = layer.self_attn.q_proj
    q.lora_A["default"].weight.data = q.lora_A["default"].weight.data.clone()  # a replaced tensor
    s1 = lg._layer_state(layer)
    assert s1 != s0
    with model.disable_adapter():
        assert lg._layer_state(layer) != s1
    assert lg._layer_state(layer) == s1
    model.eval()
    assert lg._layer_state(layer) != s1
    model.train()
    sloth.unpatch(model)  # the module forwards change
    assert lg._layer_state(layer) != s1
    sloth.patch(model)
    h = layer.mlp.up_proj.register_forward_hook(lambda *a: None)
    with pytest.raises(lg.NotGraphable, match="hooks"):
        lg._layer_state(layer)
    h.remove()
    lg._layer_state(layer)


def test_active_dropout_is_not_graphed():
    model = lora_model(dropout=0.1)
    layer = model.base_model.model.model.layers[0]
    with pytest.raises(lg.NotGraphable, match="dropout"):
        lg._layer_state(layer)
    model.eval()
    lg._layer_state(layer)


def test_split_and_fill_round_trip():
    a, b = torch.zeros(2, 3), torch.ones(4)
    tensors = []
    template, sig = lg._split(((a, None), {"x": b, "n": 3, "f": 0.5, "dt": torch.float16}), tensors)
    assert tensors[0] is a and tensors[1] is b
    out = lg._fill(template, [a + 1, b + 1])
    assert torch.equal(out[0][0], a + 1) and out[0][1] is None and torch.equal(out[1]["x"], b + 1)
    assert out[1]["n"] == 3 and out[1]["dt"] is torch.float16
    assert lg._split(((a.double(), None), {"x": b, "n": 3, "f": 0.5, "dt": torch.float16}), [])[1] != sig
    with pytest.raises(lg.NotGraphable):
        lg._split({"cache": object()}, [])


def test_cpu_runs_eagerly():
    model = lora_model()
    ids, mask, labels = make_batch()
    lg.clear()
    for _ in range(3):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert lg.graph_count() == 0


# ----------------------------------------------------------------------------------------------------------- CUDA


def _steps(model, batches, lr=1e-2):
    """Per batch two accumulated half-loss backward passes (the second adds into .grad), then an SGD step."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, grads = [], []
    for ids, mask, labels in batches:
        for _ in range(2):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss / 2).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), grads


def check_graphed_steps_equal_eager(family, device, dtype, tol, monkeypatch):
    """Seven optimizer steps with layer graphs (forward, and recompute + backward) against the same without: batches
    of one length, then two of another (a second signature), then the first again; the graphs must really be
    captured and replayed (forward: from the second micro-batch of a length; backward: from the third)."""
    lg.clear()
    base = lora_model(family).to(device, dtype)
    full = tuple(t.to(device) for t in make_batch())
    short = tuple(t[:, :-3] for t in full)
    batches = [full] * 3 + [short] * 2 + [full] * 2
    runs = {}
    for enabled in (False, True):
        monkeypatch.setattr(lg, "ENABLED", enabled)
        model = copy.deepcopy(base)
        runs[enabled] = _steps(model, batches)
        layers = model.config.num_hidden_layers
        assert lg.graph_count() == (2 * layers if enabled else 0)
        assert lg.graph_count(backward=True) == (2 * layers if enabled else 0)
    lg.clear()
    (l0, g0), (l1, g1) = runs[False], runs[True]
    torch.testing.assert_close(l1, l0, rtol=tol, atol=tol)
    for a, b in zip(g1, g0):
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=tol, atol=tol * b[n].abs().max().item(), msg=n)


class _ReplayedWork:
    """A CUDA graph's stand-in on the CPU: ``replay()`` runs the captured work again on the same static buffers."""

    def __init__(self, work, counts):
        self.work, self.counts = work, counts

    def replay(self):
        self.counts["replays"] += 1
        self.work()


@pytest.fixture
def cpu_graphs(monkeypatch):
    """Layer graphs on the CPU, each graph replaced by a re-run of its captured work: {"captures", "replays"}."""
    counts = {"captures": 0, "replays": 0}
    monkeypatch.setattr(lg, "_small_cuda", lambda h: isinstance(h, torch.Tensor) and h.dim() >= 2)

    def record(sig, work):
        counts["captures"] += 1
        work()
        return _ReplayedWork(work, counts)

    monkeypatch.setattr(lg, "_record", record)
    yield counts
    lg.clear()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_graph_bookkeeping_on_cpu(family, cpu_graphs, monkeypatch):
    """The bookkeeping around the graphs (static inputs and outputs, shared per signature; gradients of inputs and
    parameters out of the backward graph, accumulated into .grad across micro-batches; capture on the second and
    third sighting) with the graph replaced by a re-run of the captured work on the CPU: exactly the eager result."""
    check_graphed_steps_equal_eager(family, "cpu", torch.float32, 0.0, monkeypatch)
    # per layer, forward: 5 (first length) + 3 (second) + 4 (first again); backward: 4 + 2 + 4 (micro-batches after
    # the capture at the second / third sighting, two per step)
    assert cpu_graphs["replays"] == 2 * (12 + 10)
    assert cpu_graphs["captures"] == 2 * 2 * 2  # 2 layers x (forward, backward) x 2 lengths


def test_recurring_shapes_stop_new_captures(cpu_graphs):
    """More recurring batch shapes than signatures kept: after MAX_EVICTIONS drops no new shape is captured (no
    recapture every step), the shapes kept still replay, and the losses stay the eager ones."""
    lg.clear()
    model = lora_model()
    eager = copy.deepcopy(model)
    full = make_batch()
    lengths = [full[0].shape[1] - k for k in range(4)]  # 4 shapes in turn, 2 kept at a time
    batches = [tuple(t[:, :n] for t in full) for n in lengths] * 4
    got = _steps(model, batches)[0]
    captures = cpu_graphs["captures"]
    assert 0 < captures <= 2 * 2 * (lg.MAX_SIGNATURES + lg.MAX_EVICTIONS)
    assert lg._evictions[0] > lg.MAX_EVICTIONS  # the cap was reached (and reported once)
    _steps(model, batches[:4])
    assert cpu_graphs["captures"] == captures  # nothing new is captured any more
    lg.ENABLED = False
    try:
        want = _steps(eager, batches)[0]
    finally:
        lg.ENABLED = True
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphed_steps_equal_eager(family, dtype, monkeypatch):
    """On the GPU: the same kernels, so fp32 within 1e-5 relative (cuBLAS may pick another algorithm under
    capture), bf16 within 2e-2 (a few roundings of 2^-8)."""
    check_graphed_steps_equal_eager(family, "cuda", dtype, 1e-5 if dtype == torch.float32 else 2e-2, monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_follow_adapter_and_weight_changes(monkeypatch):
    """After the graphs are captured: a LoRA tensor replaced (reloaded adapter), in-place updates and adapters
    switched off give the eager model's loss."""
    lg.clear()
    model = lora_model("llama").cuda()
    ids, mask, labels = (t.cuda() for t in make_batch())

    def loss_of(enabled):
        monkeypatch.setattr(lg, "ENABLED", enabled)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()

    for _ in range(3):
        loss_of(True)
    assert lg.graph_count() == model.config.num_hidden_layers
    layer = model.base_model.model.model.layers[1]
    with torch.no_grad():
        layer.mlp.up_proj.lora_B["default"].weight.add_(0.5)  # in place: the graph reads the new values
    torch.testing.assert_close(loss_of(True), loss_of(False), rtol=1e-5, atol=1e-5)
    w = layer.self_attn.o_proj.lora_B["default"].weight
    w.data = w.data + 0.5  # a new tensor: recaptured
    torch.testing.assert_close(loss_of(True), loss_of(False), rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(loss_of(True), loss_of(False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_of(True), loss_of(False), rtol=1e-5, atol=1e-5)
