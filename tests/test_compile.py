"""torch.compile over sloth: a patched model (Llama 3, Qwen3, Mistral, Gemma 3; full fine-tuning and PEFT LoRA)
and a QLoRA model give, compiled with ``aot_eager`` and ``inductor``, the loss and gradients of the eager patched
and the unpatched model, as one graph (``fullgraph=True``), PEFT LoRA included. (The in-place RoPE of q / k views once
gave q_proj / k_proj gradients 100 % / 58 % off when compiled: sloth now rotates into new tensors under compile.)

CPU fp32 (tiny one-layer models: each compile takes seconds on 2 cores; the inductor runs of three families are
marked slow), and the same on the GPU in bf16."""

import copy

import pytest
import torch

import sloth
from sloth.integrations.peft import patch_peft_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FAMILIES = ["llama", "qwen3", "mistral", "gemma3"]
COMMON = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
              vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# fp32: the compiled graph runs the same kernels in the same order (aot_eager) or inductor's fusions of the
# unpatched model's elementwise work: reduction order only (~1e-6 seen). bf16: the compiled and eager graphs round
# intermediates differently (inductor keeps fused intermediates in fp32): a few bf16 ulps on gradients.
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every test compiles new models: no guard failures / recompile limits from the last one
    yield
    torch._dynamo.reset()


def make_model(family, lora, device, dtype):
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(**COMMON)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**COMMON, head_dim=16)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**COMMON, sliding_window=None)
    else:  # one sliding and one full layer, softcapped logits
        cfg = transformers.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 2}, head_dim=16, sliding_window=4,
                                            final_logit_softcapping=30.0,
                                            layer_types=["sliding_attention", "full_attention"])
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # norms start at 0 (Gemma) / 1 (Llama): randomize every parameter a little
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                                           init_lora_weights=False))
    return model.to(device, dtype)


def batch(device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 10), generator=g)
    labels = ids.clone()
    labels[1, :3] = -100  # some ignored positions
    return ids.to(device), labels.to(device)


def loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach().float(), {n.removeprefix("_orig_mod."): p.grad.float().clone()
                                   for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


def assert_same(got, want, tol, what):
    (loss, grads), (loss_w, grads_w) = got, want
    assert rel_err(loss, loss_w) <= tol, f"{what}: loss {loss.item()} vs {loss_w.item()}"
    assert grads.keys() == grads_w.keys() and grads
    bad = {n: round(rel_err(grads[n], grads_w[n]), 4) for n in grads if not rel_err(grads[n], grads_w[n]) <= tol}
    assert not bad, f"{what}: gradients off (relative to their max): {bad}"


def check_family(family, lora, backend, device="cpu", dtype=torch.float32):
    ref = make_model(family, lora, device, dtype)
    model = sloth.patch(copy.deepcopy(ref))
    ids, labels = batch(device)
    want = loss_and_grads(ref, ids, labels)
    eager = loss_and_grads(model, ids, labels)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    got = loss_and_grads(compiled, ids, labels)
    assert_same(eager, want, TOL[dtype], "eager patched vs unpatched")
    assert_same(got, want, TOL[dtype], f"{backend} vs unpatched")
    assert_same(got, eager, TOL[dtype], f"{backend} vs eager patched")


SLOW = pytest.mark.slow


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_aot_eager(family, lora, one_thread):
    check_family(family, lora, "aot_eager")


@pytest.mark.parametrize("family,lora", [("llama", False), pytest.param("llama", True, marks=SLOW),
                                         pytest.param("qwen3", False, marks=SLOW),
                                         pytest.param("mistral", False, marks=SLOW),
                                         pytest.param("gemma3", False, marks=SLOW)])
def test_inductor(family, lora, one_thread):
    check_family(family, lora, "inductor")


@pytest.mark.cuda
@pytest.mark.parametrize("family,lora,backend", [("llama", True, "aot_eager"), ("gemma3", True, "aot_eager"),
                                                 ("llama", False, "inductor"), pytest.param("qwen3", True, "inductor",
                                                                                            marks=SLOW)])
def test_cuda_bf16(family, lora, backend):
    check_family(family, lora, backend, "cuda", torch.bfloat16)


def test_ops_fullgraph(one_thread):
    """The differentiable ops on their own, in one fullgraph compile: RMSNorm -> fused qkv projection -> RoPE on
    its q / k views (in place in eager, functional compiled) -> SwiGLU -> linear cross-entropy (its chunk op
    writes the logits in place); same loss and gradients as eager."""
    T, H, KV, D, V = 12, 4, 2, 16, 50
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=g).mul_(0.2).requires_grad_() for s in
              [(64,), ((H + 2 * KV) * D, 64), (2 * 96, H * D), (V, 48)]]
    x = torch.randn(T, 64, generator=g)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[2] = -100
    ang = torch.arange(T)[:, None] * torch.linspace(0.1, 1.0, D // 2)[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # [T, D]

    def f(x, w_norm, w_qkv, w_up, w_head):
        h = sloth.rms_norm(x, w_norm, 1e-6)
        qkv = (h @ w_qkv.t()).view(T, H + 2 * KV, D)
        q, k = sloth.rope(qkv[:, :H], qkv[:, H:H + KV], cos, sin)
        a = torch.cat([q.reshape(T, -1), k.reshape(T, -1)], -1)[:, :H * D]
        gate, up = (a @ w_up.t()).chunk(2, -1)
        y = sloth.nn.glu(gate.contiguous(), up.contiguous())[:, :48]  # [T, 48]
        return sloth.linear_cross_entropy(y.contiguous(), w_head, labels)

    def run(fn):
        for p in params:
            p.grad = None
        loss = fn(x, *params)
        loss.backward()
        return loss.detach(), {i: p.grad.clone() for i, p in enumerate(params)}

    want = run(f)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        assert_same(run(torch.compile(f, backend=backend, fullgraph=True)), want, 1e-5, backend)


def test_qlora_compiled(one_thread):
    """bitsandbytes NF4 base weights under PEFT LoRA (sloth's NF4 dequantize into a workspace, LoRA products):
    compiled gradients equal eager ones."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    m = torch.nn.Sequential(bnb.nn.Linear4bit(64, 96, compute_dtype=torch.float32, quant_type="nf4",
                                              compress_statistics=True), torch.nn.GELU(), torch.nn.Linear(96, 32)).to("cpu")  # quantizes
    m.is_loaded_in_4bit = True
    model = peft.get_peft_model(m, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"],
                                                   init_lora_weights=False))
    model.train()
    assert patch_peft_model(model) == 2
    x = torch.randn(2, 24, 64)

    def run(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(x).float().square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = run(model)
    assert_same(run(torch.compile(model, backend="aot_eager")), want, 1e-5, "aot_eager")
