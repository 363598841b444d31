"""patch_peft_model: PEFT LoRA layers through sloth.lora_linear give PEFT's outputs and LoRA gradients."""

import logging

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

import sloth  # noqa: E402
from sloth.integrations.peft import patch_peft_model, unpatch_peft_model  # noqa: E402

# fp32 throughout: the patched path dequantizes NF4 bit-exactly as bitsandbytes does and runs the same GEMMs
# in a different grouping ((x A^T) B^T vs the same; base and LoRA summed in one addmm) -> 1e-5 relative.
TOL = 1e-5


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def two_linear(bnb4=False, bias=True):
    torch.manual_seed(0)
    if bnb4:
        bnb = pytest.importorskip("bitsandbytes")
        first = bnb.nn.Linear4bit(64, 96, bias=bias, compute_dtype=torch.float32, quant_type="nf4",
                                  compress_statistics=True)
    else:
        first = torch.nn.Linear(64, 96, bias=bias)
    m = torch.nn.Sequential(first, torch.nn.GELU(), torch.nn.Linear(96, 33, bias=bias)).to("cpu")
    if bnb4:
        m.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps Linear4bit with lora.bnb.Linear4bit
    return m


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def randomize_lora(model):
    with torch.no_grad():
        for p in lora_params(model).values():
            p.normal_(0, 0.1)  # lora_B starts at zero: make the LoRA branch matter


def run(model, x, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(x)
    if y.requires_grad:  # not with adapters disabled: nothing trainable in the graph
        y.float().square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in lora_params(model).items() if p.grad is not None}


def compare(model, x, tol=TOL, grads=True, **kw):
    y0, g0 = run(model, x, **kw)
    assert patch_peft_model(model) > 0
    y1, g1 = run(model, x, **kw)
    unpatch_peft_model(model)
    assert rel_err(y1, y0) <= tol
    assert g0.keys() == g1.keys() and (len(g0) > 0) == grads
    for n in g0:
        assert rel_err(g1[n], g0[n]) <= tol, n


@pytest.mark.parametrize("bnb4", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_two_linear(bnb4, use_rslora):
    model = get_peft_model(two_linear(bnb4), LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"],
                                                        use_rslora=use_rslora))
    if bnb4:
        from peft.tuners.lora.bnb import Linear4bit

        assert isinstance(model.base_model.model[0], Linear4bit)
    randomize_lora(model)
    compare(model, torch.randn(2, 7, 64))


@pytest.mark.parametrize("bnb4", [False, True])
def test_calls_sloth(monkeypatch, bnb4):
    model = get_peft_model(two_linear(bnb4), LoraConfig(r=8, target_modules=["0", "2"]))
    model.train()  # (in eval with no grad, bitsandbytes may repack CPU weights for its own kernels: fallback)
    calls = []
    import sloth.integrations.peft as integ

    real = integ.lora_linear
    monkeypatch.setattr(integ, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    patch_peft_model(model)
    model(torch.randn(3, 64))
    assert len(calls) == 2


@pytest.mark.parametrize("bnb4", [False, True])
def test_dropout_in_training(bnb4):
    # PEFT applies dropout to x for the LoRA branch only; the patched forward draws the same masks in the
    # same order (one dropout call per layer), so with one seed the results match.
    model = get_peft_model(two_linear(bnb4), LoraConfig(r=8, lora_dropout=0.3, target_modules=["0", "2"]))
    randomize_lora(model)
    model.train()
    compare(model, torch.randn(4, 64))
    model.eval()  # dropout off in eval: the fused path
    compare(model, torch.randn(4, 64))


def test_disabled_merged_and_multiple_adapters(caplog):
    model = get_peft_model(two_linear(), LoraConfig(r=8, target_modules=["0", "2"]))
    randomize_lora(model)
    x = torch.randn(3, 64)
    with model.disable_adapter():
        compare(model, x, grads=False)
    model.add_adapter("second", LoraConfig(r=4, target_modules=["0", "2"]))
    randomize_lora(model)
    model.base_model.set_adapter(["default", "second"])
    with caplog.at_level(logging.INFO, logger="sloth.peft"):
        compare(model, x)
    assert "2 active adapters" in caplog.text
    model.base_model.set_adapter("default")
    compare(model, x)
    model.merge_adapter()
    y0 = model(x)
    patch_peft_model(model)
    assert rel_err(model(x), y0) <= TOL
    unpatch_peft_model(model)


def test_dora_falls_back():
    model = get_peft_model(two_linear(), LoraConfig(r=8, use_dora=True, target_modules=["0", "2"]))
    randomize_lora(model)
    compare(model, torch.randn(3, 64))


def test_unpatch_restores():
    model = get_peft_model(two_linear(), LoraConfig(r=8, target_modules=["0", "2"]))
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert patch_peft_model(model) == 2
    assert patch_peft_model(model) == 0  # idempotent
    assert all("forward" in m.__dict__ for m in layers)
    assert unpatch_peft_model(model) == 2
    assert all("forward" not in m.__dict__ and not hasattr(m, "_sloth_orig_forward") for m in layers)


def test_tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj", "gate_proj", "up_proj",
                                                                                  "down_proj"]))
    randomize_lora(model)
    ids = torch.randint(0, 128, (2, 11))

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in lora_params(model).items()}

    l0, g0 = step()
    assert patch_peft_model(model) == 14
    l1, g1 = step()
    unpatch_peft_model(model)
    assert abs(l1 - l0).item() <= 1e-5 * abs(l0).item()
    for n in g0:
        assert rel_err(g1[n], g0[n]) <= 1e-4, n  # fp32 through 2 layers of attention + MLP


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bnb_cuda_bf16():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    m = torch.nn.Sequential(bnb.nn.Linear4bit(256, 512, compute_dtype=torch.bfloat16, quant_type="nf4"),
                            torch.nn.GELU(), bnb.nn.Linear4bit(512, 256, compute_dtype=torch.bfloat16,
                                                               quant_type="nf4")).cuda()
    m.is_loaded_in_4bit = True
    model = get_peft_model(m, LoraConfig(r=16, target_modules=["0", "2"]))
    randomize_lora(model)
    for M in (1, 8, 300):  # GEMV and dequantize + GEMM paths
        compare(model, torch.randn(M, 256, device="cuda", dtype=torch.bfloat16), tol=3e-2)
