"""sloth.get_peft_model on tiny checkpoints loaded by sloth.from_pretrained (CPU, NF4 and 16-bit): only LoRA
matrices train, LoRA layers / norms / loss run on sloth, patched == unpatched, optimizer steps lower the loss,
gradient checkpointing modes, and errors."""

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

import sloth  # noqa: E402
from sloth.integrations.checkpointing import gradient_checkpointing_mode  # noqa: E402
from sloth.runtime.offload_checkpoint import offloaded_checkpoint  # noqa: E402

from tiny_checkpoints import FAMILIES, TARGETS, batch  # noqa: E402

MAX_LEN = 128


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def decoder_layers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_4bit_trains_lora_only(family, checkpoints):
    model, tok = sloth.from_pretrained(checkpoints[family], max_seq_length=MAX_LEN, device_map="cpu")
    n_layers = model.config.num_hidden_layers
    pm = sloth.get_peft_model(model, r=8, lora_alpha=16)
    assert isinstance(pm, peft.PeftModel)
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(TARGETS) * n_layers
    assert all(p.dtype == torch.float32 for p in trainable.values())
    # no fp32 upcast of frozen weights beyond what was loaded; the norms are untouched
    replaced = sloth.patched_modules(pm)
    lora_lines = [r for r in replaced if "sloth.lora_linear" in r]
    assert len(lora_lines) == len(TARGETS) * n_layers and all("(NF4 base)" in r for r in lora_lines)
    assert any("sloth.rms_norm" in r for r in replaced) and any("sloth.causal_lm_loss" in r for r in replaced)
    # gradient checkpointing "sloth" is on every decoder layer
    assert gradient_checkpointing_mode(pm) == "sloth"
    layers = decoder_layers(pm)
    assert len(layers) == n_layers
    assert all(m.gradient_checkpointing and m._gradient_checkpointing_func is offloaded_checkpoint for m in layers)
    assert pm.get_base_model().config.use_cache is False

    pm.train()
    ids, mask, labels = batch(tok)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
        assert all(p.grad is None for n, p in pm.named_parameters() if n not in trainable)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[2] < losses[1] < losses[0], losses


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("load_in_4bit", [True, False])
def test_patched_equals_unpatched(family, load_in_4bit, checkpoints):
    """Loss and LoRA gradients with sloth's kernels == with PEFT / Transformers' own code, same model."""
    model, tok = sloth.from_pretrained(checkpoints[family], max_seq_length=MAX_LEN, device_map="cpu", load_in_4bit=load_in_4bit)
    pm = sloth.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)  # lora_B starts at zero: make the LoRA branch matter
    pm.train()
    ids, mask, labels = batch(tok)

    def run():
        pm.zero_grad(set_to_none=True)
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}

    loss, g = run()
    n_patched = len(sloth.patched_modules(pm))
    assert sloth.unpatch(pm) == n_patched > 2 * len(TARGETS)
    assert sloth.patched_modules(pm) == []
    loss_ref, g_ref = run()
    assert rel_err(loss, loss_ref) <= 1e-5
    assert g.keys() == g_ref.keys() and len(g) == 2 * len(TARGETS) * model.config.num_hidden_layers
    for n in g:
        assert rel_err(g[n], g_ref[n]) <= 1e-4, n


def test_checkpointing_modes_and_seed(checkpoints):
    model, _ = sloth.from_pretrained(checkpoints["llama"], max_seq_length=MAX_LEN, device_map="cpu", load_in_4bit=False)
    state = torch.get_rng_state()
    pm = sloth.get_peft_model(model, use_gradient_checkpointing=True, random_state=11)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    layers = decoder_layers(pm)
    assert gradient_checkpointing_mode(pm) is True
    assert all(m.gradient_checkpointing and m._gradient_checkpointing_func is not offloaded_checkpoint for m in layers)
    a1 = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().clone()

    model, _ = sloth.from_pretrained(checkpoints["llama"], max_seq_length=MAX_LEN, device_map="cpu", load_in_4bit=False)
    pm = sloth.get_peft_model(model, use_gradient_checkpointing=False, random_state=11, target_modules=["q_proj"])
    assert not any(m.gradient_checkpointing for m in decoder_layers(pm))
    a2 = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(a1, a2)  # random_state fixes the LoRA initialization
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in pm.named_parameters() if p.requires_grad} == {"q_proj"}


def test_sloth_checkpointing_sticks(checkpoints):
    """A Trainer's later gradient_checkpointing_enable() keeps the offloaded checkpoint; True / False unset it."""
    model, _ = sloth.from_pretrained(checkpoints["qwen3"], max_seq_length=MAX_LEN, device_map="cpu")
    pm = sloth.get_peft_model(model)
    base = pm.get_base_model()
    enable = getattr(base, "activation_checkpointing_enable", None)  # Transformers >= 5.2x; older: gradient_*
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(m._gradient_checkpointing_func is offloaded_checkpoint for m in decoder_layers(pm))
    sloth.set_gradient_checkpointing(pm, True)
    assert all(m.gradient_checkpointing and m._gradient_checkpointing_func is not offloaded_checkpoint
               for m in decoder_layers(pm))
    sloth.set_gradient_checkpointing(pm, False)
    assert not any(m.gradient_checkpointing for m in decoder_layers(pm))


def test_rslora_and_dropout(checkpoints):
    model, tok = sloth.from_pretrained(checkpoints["gemma3"], max_seq_length=MAX_LEN, device_map="cpu")
    pm = sloth.get_peft_model(model, r=16, lora_alpha=8, lora_dropout=0.1, use_rslora=True)
    layer = pm.base_model.model.model.layers[0].mlp.up_proj
    assert layer.scaling["default"] == pytest.approx(8 / 16 ** 0.5)
    pm.train()
    ids, mask, labels = batch(tok)
    loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and layer.lora_A["default"].weight.grad is not None


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(loftq_config={"loftq_bits": 4}), NotImplementedError, "LoftQ"),
    (dict(r=0), ValueError, "r must be a positive int"),
    (dict(lora_dropout=1.0), ValueError, "lora_dropout must be in"),
    (dict(bias="some"), ValueError, "bias must be"),
    (dict(use_gradient_checkpointing="offload"), ValueError, "use_gradient_checkpointing must be"),
])
def test_bad_arguments(kwargs, exc, match, checkpoints):
    model, _ = sloth.from_pretrained(checkpoints["mistral"], max_seq_length=MAX_LEN, device_map="cpu", load_in_4bit=False)
    with pytest.raises(exc, match=match) as e:
        sloth.get_peft_model(model, **kwargs)
    assert "\n" not in str(e.value)
    assert not isinstance(model, peft.PeftModel) and not any("lora_" in n for n, _ in model.named_parameters())


def test_twice_is_an_error(checkpoints):
    model, _ = sloth.from_pretrained(checkpoints["mistral"], max_seq_length=MAX_LEN, device_map="cpu", load_in_4bit=False)
    pm = sloth.get_peft_model(model)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        sloth.get_peft_model(pm)


def test_adapter_save_and_reload(checkpoints, tmp_path):
    model, tok = sloth.from_pretrained(checkpoints["llama"], max_seq_length=MAX_LEN, device_map="cpu")
    pm = sloth.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids, mask, labels = batch(tok)
    with torch.no_grad():
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    pm.save_pretrained(tmp_path)
    base, _ = sloth.from_pretrained(checkpoints["llama"], max_seq_length=MAX_LEN, device_map="cpu")
    sloth.unpatch(base)
    again = sloth.patch(peft.PeftModel.from_pretrained(base, str(tmp_path)))
    assert any("sloth.lora_linear" in r for r in sloth.patched_modules(again))
    with torch.no_grad():
        assert rel_err(again(input_ids=ids, attention_mask=mask, labels=labels).loss, loss) <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_on_gpu(family, checkpoints):
    """On a CUDA GPU: the default load (NF4, bf16 where the GPU has it) and LoRA with offloaded checkpointing train;
    the loss with sloth's kernels is close to PEFT / bitsandbytes' own."""
    model, tok = sloth.from_pretrained(checkpoints[family], max_seq_length=MAX_LEN)
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    pm = sloth.get_peft_model(model, r=8, lora_alpha=16).train()
    ids, mask, labels = (t.cuda() for t in batch(tok))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(3):
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0], losses
    with torch.no_grad():
        patched = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        sloth.unpatch(pm)
        ref = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert rel_err(patched, ref) <= 2e-2  # bf16 / fp16 rounding of differently ordered GEMMs
