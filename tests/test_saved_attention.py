"""Attention outputs saved by offloaded checkpoints (sloth.runtime.saved_attention, sloth.integrations.sdpa): what is
accepted, the "sdpa" wrapper passing everything else through unchanged (CPU); on the GPU, the saved output and
cuDNN's backward against an fp32 reference, and a checkpointed model's loss and gradients with and without saving."""

import copy

import pytest
import torch
import torch.nn.functional as F

import sloth
from sloth.runtime import layer_graphs, saved_attention
from sloth.runtime import offload_checkpoint as oc
from test_layer_graphs import cpu_graphs  # noqa: F401  (fixture)
from test_offload_checkpoint import HostStandIn

transformers = pytest.importorskip("transformers")


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def qkv(b, hq, hk, t, d, dtype, device, requires_grad=False, seed=0):
    """q [b, hq, t, d], k / v [b, hk, t, d] as Transformers makes them: views of [b, t, heads, d] projections."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for h in (hq, hk, hk):
        x = torch.randn(b, t, h, d, generator=g, device=device, dtype=torch.float32).to(dtype)
        out.append(x.transpose(1, 2).requires_grad_(requires_grad))
    return out


@pytest.mark.parametrize("case", ["ok", "mask", "dropout", "softcap", "fp32", "heads", "head_dim", "not_causal",
                                  "one_token"])
def test_unsupported_calls_are_declined(case):
    """Plain causal GQA attention is accepted; each unsupported feature is declined (the model's own attention
    runs). On the CPU even the accepted call returns None: the path is CUDA's."""
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    q, k, v = qkv(1, 6 if case == "heads" else 8, 4, 1 if case == "one_token" else 16,
                  264 if case == "head_dim" else 64, dtype, "cpu")
    mask = torch.zeros(1, 1, 16, 16) if case == "mask" else None
    dropout = 0.1 if case == "dropout" else 0.0
    kwargs = {"softcap": 30.0} if case == "softcap" else {}
    assert saved_attention._supported(q, k, v, mask, dropout, case != "not_causal", kwargs) == (case == "ok")
    with saved_attention.collecting([]):
        assert saved_attention.causal_attention(q, k, v, mask, dropout, None, case != "not_causal", kwargs) is None


def test_sdpa_wrapper_passes_through_and_installs_once():
    """After sloth.patch, Transformers' "sdpa" function is sloth's wrapper (installed once); outside an offloaded
    checkpoint's forward / recompute it computes exactly what the original does."""
    from transformers.modeling_utils import AttentionInterface

    from sloth.integrations import sdpa

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=128, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    ref = transformers.LlamaForCausalLM(cfg).float()
    model = sloth.patch(copy.deepcopy(ref))
    wrapper = AttentionInterface._global_mapping["sdpa"]
    original = getattr(wrapper, sdpa._ORIGINAL)
    assert not hasattr(original, sdpa._ORIGINAL)
    sloth.patch(copy.deepcopy(ref))
    assert AttentionInterface._global_mapping["sdpa"] is wrapper  # not wrapped twice
    ids = torch.randint(0, 128, (2, 24))
    assert torch.equal(model(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss)
    q, k, v = qkv(2, 4, 2, 24, 16, torch.float32, "cpu")
    module = model.model.layers[0].self_attn
    got, _ = wrapper(module, q, k, v, None, dropout=0.0, scaling=0.25)
    want, _ = original(module, q, k, v, None, dropout=0.0, scaling=0.25)
    assert torch.equal(got, want)


def _math_forward(q, k, v, scale):
    """The cuDNN forward's results from plain torch: O laid out [B, T, H, D] as cuDNN's, LSE [B, H, T] fp32."""
    rep = q.shape[1] // k.shape[1]
    s = (q.float() @ k.float().repeat_interleave(rep, 1).transpose(-1, -2)) * scale
    t = q.shape[2]
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (s.softmax(-1) @ v.float().repeat_interleave(rep, 1)).to(q.dtype)
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out, s.logsumexp(-1), None, None, t, t, torch.empty(0), torch.empty(0), None


def _math_backward(dout, q, k, v, out, lse, aux, scale):
    """Gradients per query head (as cuDNN's for expanded heads: the caller sums each key head's group)."""
    rep = q.shape[1] // k.shape[1]
    xs = [q.detach().requires_grad_(), k.detach().repeat_interleave(rep, 1).requires_grad_(),
          v.detach().repeat_interleave(rep, 1).requires_grad_()]
    with torch.enable_grad():  # (called inside a backward pass)
        o = F.scaled_dot_product_attention(*xs, is_causal=True, scale=scale)
        return torch.autograd.grad(o, xs, dout)


def _rejecting(*a, **k):
    raise RuntimeError("schema changed")


@pytest.fixture
def stand_ins(monkeypatch):
    """The saving path on the CPU: plain-torch stand-ins for the cuDNN kernels and the pinned copies, fp32 allowed;
    returns the counts of what recomputes took from checkpoints ("attention": saved outputs, "o": attention module
    outputs, o_proj skipped; "qkv": grouped q / k / v projections without outputs)."""
    from sloth.nn import lora_group

    monkeypatch.setattr(saved_attention, "ENABLED", True)
    monkeypatch.setattr(saved_attention, "_broken", [])
    monkeypatch.setattr(saved_attention, "DTYPES", (torch.float32,))
    monkeypatch.setattr(saved_attention, "_on_device", lambda t: True)
    monkeypatch.setattr(saved_attention, "_cudnn_forward", _math_forward)
    monkeypatch.setattr(saved_attention, "_cudnn_backward", _math_backward)
    monkeypatch.setattr(oc, "_offloads", lambda t: True)
    monkeypatch.setattr(oc, "_HostCopy", HostStandIn)
    calls = {"attention": 0, "o": 0, "qkv": 0}
    for cls, key, when in ((saved_attention.SavedAttentionFunction, "attention", lambda a: True),
                           (saved_attention.ValueOf, "o", lambda a: True),
                           (lora_group.LoraGroupNoOutputFunction, "qkv", lambda a: len(a) == 3 + 3 * 3)):
        def counted(*a, _apply=cls.apply, _key=key, _when=when):
            calls[_key] += bool(_when(a))
            return _apply(*a)

        monkeypatch.setattr(cls, "apply", counted)
    return calls


def _tiny_lora_model(family: str, dropout: float = 0.0):
    """A 2-layer fp32 PEFT LoRA model (every projection) under use_gradient_checkpointing="sloth"."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=128, tie_word_embeddings=False)
    cfg, cls = (transformers.LlamaConfig(**common), transformers.LlamaForCausalLM) if family == "llama" else \
        (transformers.Qwen3Config(**common, head_dim=16), transformers.Qwen3ForCausalLM)
    cfg._attn_implementation = "sdpa"
    model = peft.get_peft_model(cls(cfg).float(), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model = sloth.patch(model).train()
    sloth.set_gradient_checkpointing(model, "sloth")
    return model


def _check_saving_matches_recomputing(model, ids, monkeypatch, check_run):
    """One training step of ``model`` with saved attention, then one without (each from the same RNG state, so
    that dropout draws the same masks); ``check_run(on)`` after each. Loss and LoRA gradients are equal up to fp32
    rounding (the stand-in attention is not SDPA's kernel)."""
    results = []
    for on in (True, False):
        monkeypatch.setattr(saved_attention, "ENABLED", on)
        monkeypatch.setattr(saved_attention, "_broken", [])
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        check_run(on)
    (loss, grads), (loss_ref, grads_ref) = results
    assert abs(loss.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item())
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * 2
    for n in grads:
        assert rel_err(grads[n], grads_ref[n]) <= 1e-5, n


@pytest.mark.parametrize("family,backward", [("llama", "kernel"), ("qwen3", "kernel"), ("llama", "rejected")])
def test_bookkeeping_with_stand_ins(family, backward, stand_ins, monkeypatch):
    """The whole saving path on the CPU (fp32, see ``stand_ins``): a PEFT LoRA model under
    use_gradient_checkpointing="sloth" saves each layer's attention, its output and (Llama: no q / k norms) q / k /
    v, the recompute skips those products, and loss and LoRA gradients equal those of the run that recomputes
    everything (fp32 rounding: the stand-in attention is not SDPA's kernel). A backward kernel that rejects its
    call: every saved layer falls back to SDPA's backward, same gradients."""
    if backward == "rejected":
        monkeypatch.setattr(saved_attention, "_cudnn_backward", _rejecting)
    def check_run(on):
        assert bool(saved_attention._broken) == (on and backward == "rejected")
        assert stand_ins == {"attention": 2, "o": 2, "qkv": 2 if family == "llama" else 0}
        assert oc._host == {"live": 0, "attention": 0}

    _check_saving_matches_recomputing(_tiny_lora_model(family), torch.randint(0, 128, (2, 24)), monkeypatch,
                                      check_run)


@pytest.mark.parametrize("family,under_graphs", [("llama", True), ("qwen3", True)])
def test_graphed_bookkeeping_with_stand_ins(family, under_graphs, stand_ins, cpu_graphs, monkeypatch):
    """Saved attention with the layers' CUDA graphs (each graph replaced by a re-run of its captured work, see
    test_layer_graphs.cpu_graphs): the forward graph leaves the saved attentions in static buffers
    whose copies the checkpoint offloads, the backward graph takes them back from the same buffers; otherwise only
    the layers' eager runs (the first step) save theirs. Four steps on the same batch: layers captured (forward at
    the second step, backward at the second or third), the recomputes took the saved attentions (and in Llama q /
    k / v), and losses and LoRA gradients are those of the same saving run without graphs (exactly, when both
    save at every step; test_bookkeeping_with_stand_ins compares saving with recomputing)."""
    model = _tiny_lora_model(family)
    ids = torch.randint(0, 128, (2, 24))
    runs = []
    for on in (True, False):
        monkeypatch.setattr(layer_graphs, "ENABLED", on)
        layer_graphs.clear()
        m = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses, grads = [], []
        for _ in range(4):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        if on:
            assert layer_graphs.graph_count() == 2 and layer_graphs.graph_count(backward=True) == 2
            sig = next(iter(layer_graphs._signatures.values()))
            assert len(sig.saved) == (1 if under_graphs else 0)
            assert next(iter(sig.backward.values())).saved is sig.saved
        runs.append((torch.stack(losses), grads))
        assert oc._host == {"live": 0, "attention": 0}
    assert cpu_graphs["captures"] == 2 * 2
    # per layer and step one recompute took the saved attention without graphs; with them: the same
    # and once more in each backward capture (its work ran once more on the CPU); else only the first step's
    n = 2 * 4 + (2 * 4 + 2 if under_graphs else 2)
    assert stand_ins == {"attention": n, "o": n, "qkv": n if family == "llama" else 0}
    # exactly equal when both runs save at every step; else steps 2-4 recompute the attention with graphs and
    # take the saved one without: fp32 rounding of the stand-in attention
    tol = 0.0 if under_graphs else 1e-5
    (l1, g1), (l0, g0) = runs
    torch.testing.assert_close(l1, l0, rtol=tol, atol=0)
    for a, b in zip(g1, g0):
        assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
        for n in a:
            assert rel_err(a[n], b[n]) <= tol, n


CASES = [  # (batch, query heads, key heads, tokens, head dim, dtype)
    (2, 8, 2, 333, 128, torch.bfloat16),
    (1, 4, 4, 1000, 64, torch.float16),
    (3, 16, 8, 77, 256, torch.bfloat16),
    (1, 32, 8, 2048, 128, torch.bfloat16),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + str(c[5])[-4:])
def test_cuda_saved_output_and_backward(case, monkeypatch):
    """Forward (no grad, collected) then the recompute (replayed): the output and the q / k / v gradients are as
    close to an fp32 reference as torch's own SDPA in the same dtype is (within 2x its error + a few ulp)."""
    b, hq, hk, t, d, dtype = case
    monkeypatch.setattr(saved_attention, "ENABLED", True)
    q, k, v = qkv(b, hq, hk, t, d, dtype, "cuda", requires_grad=True)
    dout = torch.randn(b, t, hq, d, device="cuda", dtype=dtype)  # [B, T, Hq, D], as o_proj's backward gives it
    items: list = []
    with torch.no_grad(), saved_attention.collecting(items):
        first = saved_attention.causal_attention(q, k, v, None, 0.0, None, True, {})
    assert first is not None and len(items) == 1, saved_attention._broken
    with saved_attention.replaying(items):
        out = saved_attention.causal_attention(q, k, v, None, 0.0, None, True, {})  # [B, T, Hq, D]
    assert not items  # consumed
    assert torch.equal(out, first)  # the saved output itself
    out.backward(dout)
    got = [out.detach(), q.grad, k.grad, v.grad]

    def torch_sdpa(dt):
        xs = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        o = F.scaled_dot_product_attention(*xs, is_causal=True, enable_gqa=hq != hk).transpose(1, 2)
        o.backward(dout.to(dt))
        return [o.detach()] + [x.grad for x in xs]

    torch_same = torch_sdpa(dtype)
    exact = torch_sdpa(torch.float32)
    eps = torch.finfo(dtype).eps
    for name, g, s, e in zip(("out", "dq", "dk", "dv"), got, torch_same, exact):
        assert g.shape == e.shape and g.dtype == dtype, name
        assert rel_err(g, e) <= 2 * rel_err(s, e) + 4 * eps, (name, rel_err(g, e), rel_err(s, e))


def _model(family="llama", lora=False, layers=4):
    torch.manual_seed(0)
    common = dict(hidden_size=256, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512, vocab_size=256, max_position_embeddings=2048, tie_word_embeddings=False)
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    else:
        cfg, cls = transformers.Qwen3Config(**common, head_dim=64), transformers.Qwen3ForCausalLM
    cfg._attn_implementation = "sdpa"
    model = cls(cfg).cuda().to(torch.bfloat16)
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model = sloth.patch(model).train()
    sloth.set_gradient_checkpointing(model, "sloth")
    return model


def _step(model, ids, mask=None):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    torch.cuda.synchronize()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def count_saved(monkeypatch):
    """Counts of what recomputes took from checkpoints: "attention" (saved attention outputs), "o" (attention
    module outputs, o_proj skipped), "qkv" (grouped q / k / v projections without outputs); CUDA graphs off
    (every size saves)."""
    from sloth.nn import lora_group

    monkeypatch.setattr(layer_graphs, "ENABLED", False)
    monkeypatch.setattr(saved_attention, "ENABLED", True)
    calls = {"attention": 0, "o": 0, "qkv": 0}

    def counting(cls, key, when=lambda a: True):
        apply = cls.apply

        def counted(*a):
            calls[key] += bool(when(a))
            return apply(*a)

        monkeypatch.setattr(cls, "apply", counted)

    counting(saved_attention.SavedAttentionFunction, "attention")
    counting(saved_attention.ValueOf, "o")
    counting(lora_group.LoraGroupNoOutputFunction, "qkv", when=lambda a: len(a) == 3 + 3 * 3)
    return calls


@pytest.mark.cuda
@pytest.mark.parametrize("family,lora,padded", [("llama", False, False), ("llama", False, True), ("llama", True, False),
                                                ("qwen3", True, False)])
def test_cuda_checkpointed_model_with_saved_attention(count_saved, monkeypatch, family, lora, padded):
    """A bf16 model under use_gradient_checkpointing="sloth": every layer's recompute takes the saved attention
    (none with a padded batch, whose mask the path declines); with LoRA on every projection also the attention
    module's output (o_proj's product skipped) and, in Llama (no q / k norms), q / k / v (their projections'
    products skipped). The loss is the same (up to SDPA's kernel choice) and the gradients are within bf16
    rounding (2.5 ulp: cuDNN's dq accumulation order may differ between runs) of the run that recomputes
    everything; the host accounting returns to zero."""
    model = _model(family, lora)
    ids = torch.randint(0, 256, (2, 600), device="cuda")
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, 450:] = 0
    loss, grads = _step(model, ids, mask)
    layers = 0 if padded else 4
    want = {"attention": layers, "o": layers if lora else 0, "qkv": layers if lora and family == "llama" else 0}
    assert count_saved == want
    assert oc._host == {"live": 0, "attention": 0}
    monkeypatch.setattr(saved_attention, "ENABLED", False)
    loss_ref, grads_ref = _step(model, ids, mask)
    assert count_saved == want
    # the same cuDNN kernel when SDPA picks it (then equal); another SDPA kernel rounds the bf16 attention output
    # differently (~4e-3 per element), which the mean over 1200 tokens brings down to ~1e-4
    assert torch.allclose(loss, loss_ref, rtol=1e-3, atol=0), (loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and grads
    for n in grads:
        assert rel_err(grads[n], grads_ref[n]) <= 1e-2, n


@pytest.mark.cuda
def test_cuda_host_budget_limits_saved_attention(count_saved, monkeypatch):
    """With a host budget of about two layers' saved attention, two layers save theirs and the others recompute it;
    the gradients are unchanged."""
    model = _model()
    ids = torch.randint(0, 256, (1, 1024), device="cuda")
    per_layer = 1024 * 256 * 2 + 4 * 1024 * 4  # O [T, hidden] bf16 + LSE [heads, T] fp32, bytes
    monkeypatch.setenv("SLOTH_SAVE_ATTENTION_HOST_GB", str(2.5 * per_layer / 2**30))
    _, grads = _step(model, ids)
    assert count_saved["attention"] == 2
    monkeypatch.setenv("SLOTH_SAVE_ATTENTION_HOST_GB", "0")
    _, grads_ref = _step(model, ids)
    assert count_saved["attention"] == 2
    for n in grads:
        assert rel_err(grads[n], grads_ref[n]) <= 1e-2, n


def test_backward_falls_back_when_the_kernel_rejects(monkeypatch):
    """A backward kernel that raises (a torch whose private op changed): SDPA's own backward gives the gradients,
    one warning is logged and the path is off from then on."""
    monkeypatch.setattr(saved_attention, "_broken", [])
    monkeypatch.setattr(saved_attention, "ENABLED", True)

    def rejecting(*a, **k):
        raise RuntimeError("schema changed")

    monkeypatch.setattr(saved_attention, "_cudnn_backward", rejecting)
    q, k, v = qkv(2, 4, 2, 12, 16, torch.float32, "cpu", requires_grad=True)
    out, lse, *aux = _math_forward(q.detach(), k.detach(), v.detach(), 0.25)
    item = saved_attention.SavedAttention(out, lse, tuple(aux[:6]), 0.25)
    dout = torch.randn(2, 4, 12, 16)
    saved_attention.SavedAttentionFunction.apply(q, k, v, item).backward(dout)
    got = [q.grad, k.grad, v.grad]
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    F.scaled_dot_product_attention(*xs, is_causal=True, scale=0.25, enable_gqa=True).backward(dout)
    for g, x in zip(got, xs):
        assert torch.allclose(g, x.grad, atol=1e-6)
    assert saved_attention._broken and not saved_attention.enabled()


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cuda_saved_attention_inside_layer_graphs(monkeypatch, family):
    """Saved attention inside the layers' CUDA graphs: from the second step every layer's forward
    and recompute + backward are graph replays whose saved attentions go through the static buffers; loss and
    gradients of the fourth step are those of the same saving run without graphs, within the run-to-run spread
    of cuDNN's attention backward (its dq accumulation order may differ: 2.5 bf16 ulp)."""
    monkeypatch.setattr(saved_attention, "ENABLED", True)
    base = _model(family, lora=True)
    ids = torch.randint(0, 256, (2, 600), device="cuda")
    results = []
    for graphs in (True, False):
        monkeypatch.setattr(layer_graphs, "ENABLED", graphs)
        layer_graphs.clear()
        model = copy.deepcopy(base)
        for _ in range(4):
            loss, grads = _step(model, ids)
        if graphs:
            assert layer_graphs.graph_count() == 4 and layer_graphs.graph_count(backward=True) == 4
            sig = next(iter(layer_graphs._signatures.values()))
            assert len(sig.saved) == 1 and next(iter(sig.backward.values())).saved is sig.saved
        assert oc._host == {"live": 0, "attention": 0}
        results.append((loss, grads))
    layer_graphs.clear()
    (loss, grads), (loss_ref, grads_ref) = results
    assert torch.allclose(loss, loss_ref, rtol=1e-3, atol=0), (loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and grads
    for n in grads:
        assert rel_err(grads[n], grads_ref[n]) <= 1e-2, n


def test_eager_layers_save_beside_graphs(stand_ins, cpu_graphs, monkeypatch):
    """LoRA dropout keeps the layers out of the CUDA graphs (the recompute must draw the same masks): their eager
    runs save attention at the graphs' sizes too, and the recompute, which draws the same dropout masks, gives the
    gradients of the run that recomputes everything (fp32 rounding of the stand-in attention)."""
    def check_run(on):
        # (with LoRA dropout the projections run unfused, so only the attention itself is saved)
        assert stand_ins == {"attention": 2, "o": 0, "qkv": 0}

    _check_saving_matches_recomputing(_tiny_lora_model("llama", dropout=0.1), torch.randint(0, 128, (2, 24)),
                                      monkeypatch, check_run)
    assert layer_graphs.graph_count() == 0 and cpu_graphs["captures"] == 0
