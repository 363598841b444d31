"""sloth.FastLanguageModel: a notebook written for the popular accelerator's API runs with its import changed
(argument names, precedence of the precision flags, ignored harmless arguments, clear errors), on CPU."""

import warnings

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from sloth import FastLanguageModel  # noqa: E402
from sloth.integrations.checkpointing import gradient_checkpointing_mode  # noqa: E402
from sloth.runtime.offload_checkpoint import offloaded_checkpoint  # noqa: E402

from tiny_checkpoints import TARGETS, batch, save_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama")


def layers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def test_notebook_flow(checkpoint):
    """The usual notebook cells: load in 4-bit, add LoRA, train a step, switch to inference and generate."""
    with pytest.warns(UserWarning, match=r"from_pretrained: ignoring fix_tokenizer, rope_scaling \(not used by sloth\)"):
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=checkpoint, max_seq_length=128, dtype=None, load_in_4bit=True, token=None,
            device_map="cpu", rope_scaling=None, fix_tokenizer=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # every argument below is a known one: no warning
        model = FastLanguageModel.get_peft_model(
            model, r=16, target_modules=TARGETS, lora_alpha=16, lora_dropout=0, bias="none",
            use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=False, loftq_config=None,
            max_seq_length=128)
    assert isinstance(model, peft.PeftModel) and gradient_checkpointing_mode(model) == "sloth"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert model.get_base_model().max_seq_length == 128

    FastLanguageModel.for_training(model)
    assert model.training and all(m.gradient_checkpointing and m._gradient_checkpointing_func is offloaded_checkpoint
                                  for m in layers(model))
    ids, mask, labels = batch(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[1] < losses[0]

    assert FastLanguageModel.for_inference(model) is model
    assert not model.training and not any(m.gradient_checkpointing for m in layers(model))
    assert model.get_base_model().config.use_cache is True
    prompt = tokenizer(["Name three primary colors."], return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4

    FastLanguageModel.for_training(model)  # back to training: offloaded checkpointing again
    assert model.training and all(m.gradient_checkpointing for m in layers(model))
    assert model.get_base_model().config.use_cache is False
    FastLanguageModel.for_training(model, use_gradient_checkpointing=False)
    assert not any(m.gradient_checkpointing for m in layers(model))


@pytest.mark.parametrize("flags, quantized", [
    (dict(load_in_16bit=True), False),                      # load_in_4bit defaults to True: 16-bit wins
    (dict(load_in_4bit=False), False),
    (dict(load_in_8bit=True), "8bit"),                      # 8-bit wins over the default 4-bit
    (dict(full_finetuning=True), False),
])
def test_precision_flags(flags, quantized, checkpoint):
    model, _ = FastLanguageModel.from_pretrained(checkpoint, max_seq_length=128, device_map="cpu", **flags)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) is False
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) is (quantized == "8bit")
    if flags.get("full_finetuning"):
        assert all(p.requires_grad for p in model.parameters())
        assert gradient_checkpointing_mode(model) == "sloth" and all(m.gradient_checkpointing for m in layers(model))


def test_errors(checkpoint):
    with pytest.raises(NotImplementedError, match="fast_inference=True"):
        FastLanguageModel.from_pretrained(checkpoint, fast_inference=True)
    with pytest.raises(ValueError, match="load_in_8bit=True cannot be combined"):
        FastLanguageModel.from_pretrained(checkpoint, load_in_8bit=True, load_in_16bit=True)
    model, _ = FastLanguageModel.from_pretrained(checkpoint, max_seq_length=128, device_map="cpu", load_in_16bit=True)
    with pytest.raises(NotImplementedError, match="LoftQ") as e:
        FastLanguageModel.get_peft_model(model, loftq_config={"loftq_bits": 4})
    assert "\n" not in str(e.value)
    with pytest.raises(NotImplementedError, match="qat_scheme"):
        FastLanguageModel.get_peft_model(model, qat_scheme="int4")


def test_unknown_lora_kwargs_warn_and_lora_fields_pass(checkpoint):
    model, _ = FastLanguageModel.from_pretrained(checkpoint, max_seq_length=128, device_map="cpu", load_in_16bit=True)
    with pytest.warns(UserWarning, match=r"get_peft_model: ignoring finetune_vision_layers, temporary_location"):
        model = FastLanguageModel.get_peft_model(model, r=4, loftq_config={}, layers_to_transform=[1],
                                                 finetune_vision_layers=False, temporary_location="/tmp/x",
                                                 use_gradient_checkpointing=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable)  # layers_to_transform reached LoraConfig
    assert gradient_checkpointing_mode(model) is False


def test_saved_adapter_folder_loads_with_its_base(checkpoint, tmp_path):
    """FastLanguageModel.from_pretrained on a folder written by model.save_pretrained of a LoRA model: the base
    model from adapter_config.json, the adapter on it (trainable, on sloth's kernels), the same logits."""
    import sloth

    model, tok = FastLanguageModel.from_pretrained(checkpoint, max_seq_length=128, device_map="cpu", load_in_16bit=True)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False,
                                             init_lora_weights=False)
    model.save_pretrained(tmp_path / "lora_model")
    tok.save_pretrained(tmp_path / "lora_model")
    ids, mask, _ = batch(tok)
    with torch.no_grad():
        want = model.eval()(input_ids=ids, attention_mask=mask).logits
    again, tok2 = FastLanguageModel.from_pretrained(str(tmp_path / "lora_model"), max_seq_length=128, device_map="cpu",
                                                    load_in_16bit=True, use_gradient_checkpointing=False)
    assert isinstance(again, peft.PeftModel) and len(sloth.patched_modules(again)) > 0
    assert any(p.requires_grad for n, p in again.named_parameters() if "lora_" in n)
    assert tok2.get_vocab() == tok.get_vocab() and hasattr(again, "save_pretrained_merged")
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=ids, attention_mask=mask).logits, want)
