"""`sloth finetune` on the CPU: outputs, loss going down, adapter reload, label masking, exact gradient
accumulation and one-line CLI errors."""

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest
import torch

try:  # the train extra installs gguf; without it the GGUF export checks are skipped
    import gguf  # noqa: F401

    HAS_GGUF = True
except ImportError:
    HAS_GGUF = False

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("datasets")

from sloth.finetune import FinetuneConfig  # noqa: E402
from sloth.finetune.data import IGNORE_INDEX, collate, tokenize_conversation  # noqa: E402
from sloth.finetune.loading import make_trainable  # noqa: E402
from sloth.finetune.loss import count_items, sloth_loss  # noqa: E402
from sloth.finetune.model import build_tiny_llama  # noqa: E402
from sloth.finetune.train import finetune, train_step  # noqa: E402

TINY = [
    {"instruction": "Reverse the string.", "input": "lantern", "output": "nretnal"},
    {"instruction": "What is the capital of Peru?", "input": "", "output": "The capital of Peru is Lima."},
    {"instruction": "Compute the result.", "input": "12 + 30", "output": "42"},
    {"instruction": "Give the opposite of the word.", "input": "early", "output": "late"},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run on 4 repeated examples (memorizable), shared by the output tests."""
    d = tmp_path_factory.mktemp("ft")
    data = d / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY * 4))
    cfg = FinetuneConfig(dataset=str(data), output_dir=str(d / "out"), steps=25, batch_size=4, max_seq_length=48,
                         lr=5e-3, progress=False, exports=("merged-fp32",) + (("gguf-q8_0",) if HAS_GGUF else ()),
                         device="cpu")  # the CPU run these checks are written for, also where a GPU is visible
    return finetune(cfg, log=lambda msg: None)


def test_outputs_written(run):
    out = run.output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "loss.png", "summary.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["steps"] == 25 and len(s["losses"]) == 25 and not s["interrupted"]
    assert s["device"] == "cpu" and s["dtype"] == "fp32"
    assert s["tokens_per_s"] > 0 and s["peak_memory_bytes"] > 0 and s["wall_time_s"] > 0
    assert s["config"]["batch_size"] == 4
    assert s["final_loss"] < s["initial_loss"] - 0.5, s["losses"]


def test_loss_png_is_valid(run):
    png = open(os.path.join(run.output_dir, "loss.png"), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", png[8:16])
    assert kind == b"IHDR" and length == 13
    w, h, depth, color = struct.unpack(">IIBB", png[16:26])
    assert (depth, color) == (8, 2) and w > 100 and h > 100
    assert struct.unpack(">I", png[29:33])[0] == zlib.crc32(png[12:29]) & 0xFFFFFFFF
    assert png.endswith(b"IEND\xaeB`\x82")


def test_saved_tokenizer_has_chat_template(run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run.output_dir)
    assert tok.chat_template and tok.pad_token and tok.eos_token


def test_adapter_reloads_with_same_logits(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run.summary["base_model"], dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, run.output_dir).eval()
    ids = torch.tensor([run.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute the result.\n\n12 + 30"}], add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"]])  # [1, T]
    with torch.no_grad():
        want = run.model(input_ids=ids).logits  # [1, T, V]
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), reloaded.disable_adapter():
        untrained = reloaded(input_ids=ids).logits
    assert (untrained - want).abs().max() > 1e-3  # the adapter does something


def test_labels_mask_the_prompt(tok):
    msgs = [{"role": "user", "content": "Reverse the string.\n\nriver"}, {"role": "assistant", "content": "revir"}]
    ids, labels = tokenize_conversation(tok, msgs, 128)
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=True)
    n = len(prompt["input_ids"])
    assert ids[:n] == prompt["input_ids"]
    assert all(x == IGNORE_INDEX for x in labels[:n])
    assert labels[n:] == ids[n:]
    assert tok.decode(labels[n:]).startswith("revir" + tok.eos_token)
    ids2, labels2 = tokenize_conversation(tok, msgs, 8)  # truncation
    assert len(ids2) == len(labels2) == 8
    batch = collate([(ids, labels), (ids2, labels2)], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ids))
    assert (batch["labels"][1, 8:] == IGNORE_INDEX).all() and (batch["attention_mask"][1, 8:] == 0).all()


def _lora_model(tok):
    model = make_trainable(build_tiny_llama(tok, seed=1), "lora", 8, 16.0, 0.0)
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; make the LoRA branch live
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_grad_accumulation_is_exact(tok):
    convs = [
        [{"role": "user", "content": "What is the capital of Japan?"},
         {"role": "assistant", "content": "The capital of Japan is Tokyo."}],
        [{"role": "user", "content": "Compute the result.\n\n7 * 8"}, {"role": "assistant", "content": "56"}],
    ]
    ex = [tokenize_conversation(tok, m, 64) for m in convs]
    pad = tok.pad_token_id
    model = _lora_model(tok)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads_of(micro):
        model.zero_grad(set_to_none=True)
        loss = train_step(model, micro, torch.float32)
        return loss, [p.grad.clone() for p in params]

    one_loss, one_grads = grads_of([collate(ex, pad)])
    acc_loss, acc_grads = grads_of([collate(ex[:1], pad), collate(ex[1:], pad)])
    assert count_items(collate(ex, pad)["labels"]) > 0
    torch.testing.assert_close(torch.tensor(acc_loss), torch.tensor(one_loss), rtol=1e-6, atol=1e-6)
    for a, b in zip(acc_grads, one_grads):
        # the same fp32 sums in another order (two micro-batches vs one batch; the BLAS's blocking differs by
        # CPU): a few ulps of the largest partial sum, so atol scales with the gradient's magnitude
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()) + 1e-9)
    # and the loss is the mean token cross-entropy of the model's own logits
    batch = collate(ex, pad)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
        ours = sloth_loss(model, batch, None, torch.float32)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sloth", "finetune", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_missing_dataset_is_one_line_error(tmp_path):
    r = _cli("--dataset", "missing.jsonl", "--output-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sloth finetune: error:"), r.stderr
    assert "missing.jsonl" in lines[0] and "not found" in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "--steps"),
    (["--lr", "abc"], "--lr"),
    (["--method", "dora"], "--method"),
    (["--method", "qlora"], "CUDA"),
])
def test_cli_bad_arguments(args, words, tmp_path, capsys):
    from sloth.cli import main

    if "qlora" in args and torch.cuda.is_available():
        pytest.skip("qlora is valid on a GPU")
    try:
        rc = main(["finetune", *args, "--output-dir", str(tmp_path / "o")])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("sloth finetune: error:") and words in err[0], err


def test_cli_unknown_column_and_model_family(tmp_path, capsys):
    from transformers import ViTConfig

    from sloth.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    rc = main(["finetune", "--dataset", str(data), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--instruction-column" in err[0] and "'instruction'" in err[0], err

    ViTConfig().save_pretrained(tmp_path / "vit")
    rc = main(["finetune", "--model", str(tmp_path / "vit"), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("sloth finetune: error:") and "causal" in err[0], err


def test_exports_written(run):
    """--export merged-fp32,gguf-q8_0: the merged checkpoint gives the trained adapter model's logits; the GGUF file
    and its Modelfile are there."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    ex = run.summary["exports"]
    assert set(ex) == {"merged-fp32", "gguf-q8_0"}
    merged = AutoModelForCausalLM.from_pretrained(ex["merged-fp32"], dtype=torch.float32).eval()
    ids = torch.tensor([[1, 4, 200, 300, 400, 5]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, run.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    r = gguf.GGUFReader(ex["gguf-q8_0"])
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    mf = open(os.path.join(os.path.dirname(ex["gguf-q8_0"]), "Modelfile")).read()
    assert mf.startswith("FROM ./model-q8_0.gguf")


def test_method_flags():
    import argparse

    from sloth.finetune.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert config_from_args(p.parse_args([])).method == "lora"
    for flag, method in (("--lora", "lora"), ("--qlora", "qlora"), ("--full", "full")):
        assert config_from_args(p.parse_args([flag])).method == method
    assert config_from_args(p.parse_args(["--export", "merged,gguf-q8_0,merged"])).exports == ("merged", "gguf-q8_0")


@pytest.mark.parametrize("args, words", [
    (["--export", "onnx"], "--export"),
    (["--export", ","], "--export"),
    (["--lora", "--full"], "not allowed"),
])
def test_cli_bad_export_and_method_flags(args, words, tmp_path, capsys):
    from sloth.cli import main

    try:
        rc = main(["finetune", *args, "--output-dir", str(tmp_path / "o")])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("sloth finetune: error:") and words in err[0], err


def test_cli_gguf_export_of_other_family_fails_before_training(tmp_path, capsys, tok):
    pytest.importorskip("gguf")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sloth.cli import main

    d = tmp_path / "qwen"
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=48, head_dim=16)).save_pretrained(d)
    tok.save_pretrained(d)
    rc = main(["finetune", "--model", str(d), "--export", "gguf-q8_0", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "llama architecture" in err[0] and "--export merged" in err[0], err
    assert not (tmp_path / "o" / "summary.json").exists()  # nothing was trained


def test_cli_bf16_on_a_gpu_without_it(tmp_path, capsys, monkeypatch):
    """--dtype bf16 where the GPU has no bf16 (simulated): one line that says to use fp16."""
    from sloth.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    rc = main(["finetune", "--dtype", "bf16", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Tesla T4" in err[0] and "--dtype fp16" in err[0], err
