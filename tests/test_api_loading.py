"""sloth.from_pretrained on tiny random-weight checkpoints of every supported family (CPU): 16-bit and NF4 4-bit
(bitsandbytes' CPU backend) loads, 8-bit, the tokenizer, patched vs unpatched loss, and one-line errors."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

import sloth  # noqa: E402
from sloth.api.precision import resolve_dtype  # noqa: E402

from tiny_checkpoints import FAMILIES, TARGETS, batch  # noqa: E402

MAX_LEN = 128


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def loss_of(model, tok):
    """The loss in train mode (the tiny configs have no dropout): in eval mode with no grad, bitsandbytes
    repacks 4-bit weights on CPUs with AVX512-BF16 for a kernel that is off by up to ~1e-2 relative."""
    ids, mask, labels = batch(tok)
    model.train()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize("family", FAMILIES)
def test_16bit_load_matches_transformers(family, checkpoints):
    model, tok = sloth.from_pretrained(checkpoints[family], max_seq_length=MAX_LEN, device_map="cpu", load_in_4bit=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32)
    assert model.dtype == torch.float32  # the CPU default
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert tok.pad_token is not None and tok.model_max_length == MAX_LEN and model.max_seq_length == MAX_LEN
    replaced = sloth.patched_modules(model)
    assert any("sloth.rms_norm" in r for r in replaced) and any("sloth.causal_lm_loss" in r for r in replaced)
    loss, loss_ref = loss_of(model, tok), loss_of(ref, tok)
    assert torch.isfinite(loss) and rel_err(loss, loss_ref) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_load_nf4_double_quant(family, checkpoints):
    model, tok = sloth.from_pretrained(checkpoints[family], max_seq_length=MAX_LEN, device_map="cpu")  # 4-bit is the default
    quantized = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == set(TARGETS)
    assert type(model.lm_head) is torch.nn.Linear  # the head stays in 16/32 bit
    w = model.model.layers[0].mlp.down_proj.weight
    assert isinstance(w, bnb.nn.Params4bit) and w.quant_state.quant_type == "nf4"
    assert w.quant_state.nested and w.quant_state.blocksize == 64  # double-quantized absmax
    assert w.quant_state.dtype == torch.float32  # compute dtype on the CPU
    # the packed weights dequantize to the checkpoint's weights within NF4 error
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32)
    deq = sloth.nf4_dequantize(w.data, w.quant_state)
    w_ref = ref.model.layers[0].mlp.down_proj.weight
    assert deq.shape == w_ref.shape and rel_err(deq, w_ref) < 0.2
    # patched (sloth kernels) vs unpatched (bitsandbytes / Transformers) on the same quantized model
    loss = loss_of(model, tok)
    assert sloth.unpatch(model) > 0
    assert rel_err(loss, loss_of(model, tok)) <= 1e-5


def test_8bit_load(checkpoints):
    model, tok = sloth.from_pretrained(checkpoints["llama"], max_seq_length=MAX_LEN, device_map="cpu", load_in_8bit=True)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert torch.isfinite(loss_of(model, tok))


def test_full_finetuning_and_dtype(checkpoints):
    model, _ = sloth.from_pretrained(checkpoints["qwen3"], max_seq_length=MAX_LEN, device_map="cpu", full_finetuning=True)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model, _ = sloth.from_pretrained(checkpoints["qwen3"], max_seq_length=MAX_LEN, device_map="cpu", load_in_4bit=False,
                                     dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_prequantized_checkpoint(checkpoints, tmp_path):
    model, tok = sloth.from_pretrained(checkpoints["mistral"], max_seq_length=MAX_LEN, device_map="cpu")
    loss = loss_of(model, tok)
    sloth.unpatch(model)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = sloth.from_pretrained(str(tmp_path), max_seq_length=MAX_LEN, device_map="cpu")
    assert isinstance(again.model.layers[1].self_attn.o_proj, bnb.nn.Linear4bit)
    # 1e-5, not bit-exact: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference and
    # save_pretrained unpacks them; the round trip moves the loss by ~1e-6 relative
    assert rel_err(loss_of(again, tok2), loss) <= 1e-5
    with pytest.raises(ValueError, match="bitsandbytes 4-bit checkpoint"):
        sloth.from_pretrained(str(tmp_path), load_in_4bit=False)


def test_long_max_seq_length_warns(checkpoints):
    with pytest.warns(UserWarning, match="exceeds the model's max_position_embeddings=256"):
        sloth.from_pretrained(checkpoints["llama"], max_seq_length=4096, load_in_4bit=False)


def test_unsupported_family(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        sloth.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert "'gpt2'" in msg and "\n" not in msg
    for name in ("Llama (llama)", "Qwen3 (qwen3)", "Mistral (mistral)", "Gemma 3 (text) (gemma3_text)"):
        assert name in msg


@pytest.mark.parametrize("flags, match", [
    (dict(load_in_4bit=True, load_in_8bit=True), "load_in_4bit and load_in_8bit are both True"),
    (dict(load_in_4bit=True, full_finetuning=True), "cannot be combined with load_in_4bit=True"),
    (dict(load_in_8bit=True, full_finetuning=True), "cannot be combined with load_in_8bit=True"),
    (dict(max_seq_length=0), "max_seq_length must be a positive int"),
    (dict(dtype="float64"), "dtype must be None"),
])
def test_bad_flags(flags, match, checkpoints):
    with pytest.raises(ValueError, match=match) as e:
        sloth.from_pretrained(checkpoints["llama"], **flags)
    assert "\n" not in str(e.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(OSError, match="cannot load the config of") as e:
        sloth.from_pretrained(str(tmp_path / "nope"), local_files_only=True)
    assert "\n" not in str(e.value)


def test_bf16_on_gpu_without_bf16(checkpoints, monkeypatch):
    with pytest.raises(ValueError, match=r"dtype=bfloat16 but the GPU \(Tesla T4\) has no bf16 support"):
        resolve_dtype(torch.bfloat16, "cuda", bf16_supported=False, device_name="Tesla T4")
    assert resolve_dtype(None, "cuda", bf16_supported=False) == torch.float16
    assert resolve_dtype(None, "cuda", bf16_supported=True) == torch.bfloat16
    assert resolve_dtype(None, "cpu") == torch.float32
    # through from_pretrained: an old GPU (no bf16) is visible; the error comes before any weight is loaded
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ValueError, match=r"Tesla V100\) has no bf16 support; pass dtype=torch.float16"):
        sloth.from_pretrained(checkpoints["gemma3"], dtype=torch.bfloat16)
