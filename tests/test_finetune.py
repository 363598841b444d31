"""`sloth finetune` on the CPU, on the whole stack (sloth.from_pretrained -> sloth.get_peft_model -> TRL's
SFTTrainer): sloth's kernels in the model, checkpointing on, loss going down on the responses only, outputs
(adapter, tokenizer, loss.png drawn with matplotlib, loss.csv, summary.json) written atomically, rows without a
response skipped, an earlier run refused unless --overwrite, no write through symbolic links, Ctrl-C during the
save not losing the adapter, one-line CLI errors (bad template, export limits checked before training)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("datasets")

from sloth.finetune import FinetuneConfig, FinetuneError  # noqa: E402
from sloth.finetune.train import finetune  # noqa: E402

TINY = [
    {"instruction": "Reverse the string.", "input": "lantern", "output": "nretnal"},
    {"instruction": "What is the capital of Peru?", "input": "", "output": "The capital of Peru is Lima."},
    {"instruction": "Compute the result.", "input": "12 + 30", "output": "42"},
    {"instruction": "Give the opposite of the word.", "input": "early", "output": "late"},
]
#: rows with nothing to learn: a null, an empty, a blank and a missing response
EMPTY = [
    {"instruction": "Say nothing.", "input": "", "output": None},
    {"instruction": "Say nothing again.", "input": "", "output": ""},
    {"instruction": "Blank.", "input": "", "output": "   "},
    {"instruction": "Missing.", "input": ""},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def quick(tmp_path, name="out", **kw):
    """A FinetuneConfig for a run of a few steps on the tiny data (CPU, no bar, no exports)."""
    d = dict(dataset=write_jsonl(tmp_path / "tiny.jsonl", TINY * 2), output_dir=str(tmp_path / name), steps=2,
             batch_size=4, max_seq_length=48, progress=False, device="cpu")
    d.update(kw)
    return FinetuneConfig(**d)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short run on 4 repeated examples (memorizable) plus 4 rows without a response, with the exports."""
    d = tmp_path_factory.mktemp("ft")
    data = write_jsonl(d / "tiny.jsonl", TINY * 4 + EMPTY)
    cfg = FinetuneConfig(dataset=data, output_dir=str(d / "out"), steps=25, batch_size=4, max_seq_length=48,
                         lr=5e-3, progress=False, exports=("merged-fp32", "gguf-q8_0"), device="cpu")
    return finetune(cfg, log=lambda msg: None)


def test_runs_on_sloth_with_checkpointing(run):
    """The trainer's model is sloth-patched (norms, LoRA layers, loss) and offloaded checkpointing is on."""
    import sloth
    from sloth.integrations.checkpointing import gradient_checkpointing_mode, transformers_model

    assert len(sloth.patched_modules(run.model)) > 0 and run.summary["sloth_patched_modules"] > 0
    assert gradient_checkpointing_mode(run.model) == "sloth"
    assert transformers_model(run.model).is_gradient_checkpointing
    assert type(run.trainer).__name__ == "SFTTrainer"


def test_outputs_written(run):
    out = run.output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "loss.png", "loss.csv",
                 "summary.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]  # no temporary left behind
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["steps"] == 25 and len(s["losses"]) == 25 and not s["interrupted"]
    assert s["device"] == "cpu" and s["dtype"] == "fp32" and s["skipped_rows"] == 4 and s["examples"] == 16
    assert s["tokens_per_s"] > 0 and s["peak_memory_bytes"] > 0 and s["wall_time_s"] > 0
    assert s["config"]["batch_size"] == 4 and set(s["exports"]) == {"merged-fp32", "gguf-q8_0"}
    assert s["final_loss"] < s["initial_loss"] - 0.5, s["losses"]
    rows = open(os.path.join(out, "loss.csv")).read().splitlines()
    assert rows[0] == "step,loss,eval_loss" and len(rows) == 26 and rows[1].startswith("1,")


def test_loss_plot_is_readable():
    """The plot has labelled axes, numbers on the ticks and a title naming the model and the method."""
    pytest.importorskip("matplotlib")
    from sloth.finetune.plot import loss_figure, loss_png

    losses = [(i + 1, 5.0 / (i + 1) + 1) for i in range(40)]
    fig = loss_figure(losses, "bundled tiny Llama: lora, r=16", eval_losses=[(20, 1.5), (40, 1.2)])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "optimizer step" and "loss" in ax.get_ylabel()
    assert ax.get_title() == "bundled tiny Llama: lora, r=16"
    fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
    assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert len(ax.get_lines()) == 3  # per step, running mean, eval
    png = loss_png(losses, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_matplotlib_writes_csv_and_says_so(tmp_path, monkeypatch):
    import builtins

    from sloth.finetune import plot

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert plot.write_loss_outputs(str(tmp_path / "loss.csv"), str(tmp_path / "loss.png"), [(1, 2.0)], "t") is False
    assert (tmp_path / "loss.csv").read_text() == "step,loss,eval_loss\n1,2.0,\n"
    assert not (tmp_path / "loss.png").exists()


def test_loss_is_on_the_responses_only(run):
    """TRL's labels (from its completion mask) cover exactly the response and the template's end of turn."""
    tok = run.tokenizer
    row = run.trainer.train_dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    n_prompt = next(i for i, x in enumerate(labels) if x != -100)
    assert all(x == -100 for x in labels[:n_prompt]) and labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[:n_prompt]).endswith("<|assistant|>\n")
    assert tok.decode(ids[n_prompt:]).endswith(tok.eos_token + "\n") or tok.decode(ids[n_prompt:]).endswith(
        tok.eos_token)


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
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # sloth's kernels vs PEFT's plain layers in fp32
    with torch.no_grad(), reloaded.disable_adapter():
        untrained = reloaded(input_ids=ids).logits
    assert (untrained - want).abs().max() > 1e-3  # the adapter does something


def test_bundled_folder_loads_on_its_own(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = run.summary["base_model"]
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and len(tok) == AutoModelForCausalLM.from_pretrained(path).config.vocab_size


def test_exports_written(run):
    """--export merged-fp32,gguf-q8_0: the merged checkpoint gives the trained adapter model's logits; the GGUF file
    and its Modelfile are there."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    ex = run.summary["exports"]
    merged = AutoModelForCausalLM.from_pretrained(ex["merged-fp32"], dtype=torch.float32).eval()
    ids = torch.tensor([[1, 4, 200, 300, 400, 5]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, run.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    r = gguf.GGUFReader(ex["gguf-q8_0"])
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    mf = open(os.path.join(os.path.dirname(ex["gguf-q8_0"]), "Modelfile")).read()
    assert mf.startswith("FROM ./model-q8_0.gguf")


# ------------------------------------------------------------------------------------------ losing no work

def test_rows_without_a_response_are_skipped_or_an_error(tmp_path):
    from sloth.finetune.data import prepare_dataset

    ds, skipped = prepare_dataset(FinetuneConfig(dataset=write_jsonl(tmp_path / "d.jsonl", TINY + EMPTY)))
    assert skipped == 4 and len(ds) == 4
    assert all(r["completion"][0]["content"] not in ("None", "", "   ") for r in ds)
    with pytest.raises(FinetuneError, match="no row of the dataset has a response"):
        prepare_dataset(FinetuneConfig(dataset=write_jsonl(tmp_path / "e.jsonl", EMPTY)))


def test_earlier_run_is_refused_and_overwrite_clears_it(tmp_path):
    """A second run into the same folder is refused (nothing touched); with --overwrite the old adapter, merged/ and
    gguf/ go away (the merged / GGUF of the old adapter would not belong to the new one)."""
    finetune(quick(tmp_path), log=lambda m: None)
    out = tmp_path / "out"
    for d in ("merged", "gguf"):
        (out / d).mkdir()
        (out / d / "stale").write_text("old")
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FinetuneError, match="holds an earlier run.*--overwrite"):
        finetune(quick(tmp_path), log=lambda m: None)
    assert (out / "adapter_model.safetensors").read_bytes() == before and (out / "merged" / "stale").exists()
    with pytest.raises(FinetuneError, match="no column"):  # a failing --overwrite run removes nothing
        finetune(quick(tmp_path, overwrite=True, output_column="answer"), log=lambda m: None)
    assert (out / "adapter_model.safetensors").read_bytes() == before and (out / "merged" / "stale").exists()
    finetune(quick(tmp_path, overwrite=True, seed=1), log=lambda m: None)
    assert not (out / "merged").exists() and not (out / "gguf").exists()
    assert (out / "adapter_model.safetensors").is_file() and (out / "bundled" / "config.json").is_file()


def test_no_write_follows_a_symlink_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("summary.json", "loss.png", "loss.csv", "adapter_model.safetensors", "tokenizer.json"):
        os.symlink(outside, out / name)
    finetune(quick(tmp_path, overwrite=True), log=lambda m: None)
    assert outside.read_text() == "precious"
    for name in ("summary.json", "loss.csv", "adapter_model.safetensors", "tokenizer.json"):
        assert (out / name).is_file() and not (out / name).is_symlink(), name


def test_outputs_folder_through_a_symlinked_subfolder_is_refused(tmp_path):
    from sloth.finetune.outputs import inside, prepare_output_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "gguf")
    with pytest.raises(FinetuneError, match="leads out of the output folder"):
        inside(str(tmp_path / "out"), os.path.join("gguf", "model.gguf"))
    (tmp_path / "out2").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out2" / "bundled")
    with pytest.raises(FinetuneError, match="symbolic link"):  # the bundled model would be saved through it
        prepare_output_dir(str(tmp_path / "out2"), False, False)
    with pytest.raises(FinetuneError, match="symbolic link"):  # --resume: the Trainer would write through it
        prepare_output_dir(str(tmp_path / "out"), False, True)
    assert not os.listdir(tmp_path / "elsewhere")


def test_ctrl_c_during_the_save_does_not_lose_the_adapter(tmp_path):
    """A SIGINT arriving while the outputs are written is held back until they are complete, then raised."""
    from sloth.finetune.outputs import sigint_deferred
    from sloth.finetune.train import save_outputs

    class Progress:
        losses, eval_losses = [(1, 2.0)], []

    class Model:
        def save_pretrained(self, d):
            with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
                f.write(b"a" * 1000)
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, mid-save
            with open(os.path.join(d, "adapter_config.json"), "w") as f:
                f.write("{}")

    class Tok:
        def save_pretrained(self, d):
            open(os.path.join(d, "tokenizer.json"), "w").write("{}")

    out = tmp_path / "o"
    out.mkdir()
    lines = []
    with pytest.raises(KeyboardInterrupt):
        with sigint_deferred(lines.append):
            save_outputs(str(out), Model(), Tok(), {"losses": [2.0]}, Progress(), "t", lines.append)
    assert (out / "adapter_model.safetensors").read_bytes() == b"a" * 1000
    assert (out / "adapter_config.json").is_file() and (out / "summary.json").is_file()
    assert any("still saving" in m for m in lines)


def test_failed_save_keeps_the_earlier_adapter(tmp_path):
    from sloth.finetune.outputs import save_into

    (tmp_path / "adapter_model.safetensors").write_bytes(b"old")

    def broken(d):
        open(os.path.join(d, "adapter_model.safetensors"), "wb").write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_into(str(tmp_path), broken)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"old"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


# --------------------------------------------------------------------------------------------- the command line

def _cli(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-m", "sloth", "finetune", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=240, env=env)


def _main(capsys, *args):
    from sloth.cli import main

    try:
        rc = main(["finetune", *args])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.slow
def test_cli_quiet_run_prints_only_ours(tmp_path):
    """A plain CPU run prints nothing from third parties (bitsandbytes, transformers, TRL, datasets): every line
    is sloth's own or the progress bar's."""
    data = write_jsonl(tmp_path / "d.jsonl", TINY * 2)
    r = _cli("--dataset", data, "--steps", "3", "--batch-size", "4", "--output-dir", str(tmp_path / "o"),
             "--max-seq-length", "48", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in (r.stderr + r.stdout).replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[0].startswith("sloth finetune: bundled tiny Llama"), lines[:3]
    others = [ln for ln in lines if not ln.startswith("sloth finetune:") and "it/s" not in ln and "step" not in ln
              and "%|" not in ln]
    assert not others, others
    assert "sloth kernels" in lines[0] and lines[-1].startswith("sloth finetune: 3 steps")


def test_cli_missing_dataset_is_one_line_error(tmp_path, capsys):
    rc, err = _main(capsys, "--dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "o"))
    assert rc == 2 and len(err) == 1 and err[0].startswith("sloth finetune: error:"), err
    assert "missing.jsonl" in err[0] and "not found" in err[0]


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "--steps"),
    (["--lr", "abc"], "--lr"),
    (["--method", "dora"], "--method"),
    (["--method", "qlora"], "CUDA"),
    (["--export", "onnx"], "--export"),
    (["--export", ","], "--export"),
    (["--lora", "--full"], "not allowed"),
    (["--chat-template", "{% for m in messages %}{{ m['content'] }"], "not valid Jinja"),
    (["--chat-template", "{{ messages[0]['content'] | nosuchfilter }}"], "--chat-template"),
    (["--chat-template", "hello"], "neither a file nor a Jinja"),
])
def test_cli_bad_arguments(args, words, tmp_path, capsys):
    if "qlora" in args and torch.cuda.is_available():
        pytest.skip("qlora is valid on a GPU")
    rc, err = _main(capsys, *args, "--output-dir", str(tmp_path / "o"))
    assert rc == 2 and len(err) == 1 and err[0].startswith("sloth finetune: error:") and words in err[0], err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_cli_unknown_column_and_model_family(tmp_path, capsys):
    from transformers import ViTConfig

    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    rc, err = _main(capsys, "--dataset", data, "--output-dir", str(tmp_path / "o"))
    assert rc == 2 and len(err) == 1 and "--instruction-column" in err[0] and "'instruction'" in err[0], err
    ViTConfig().save_pretrained(tmp_path / "vit")
    rc, err = _main(capsys, "--model", str(tmp_path / "vit"), "--output-dir", str(tmp_path / "o2"))
    assert rc == 2 and len(err) == 1 and err[0].startswith("sloth finetune: error:") and "causal" in err[0], err


def test_cli_gguf_export_limits_fail_before_training(tmp_path, capsys, tok):
    """A model the GGUF exporter cannot write (attention biases) fails before training, in one line."""
    pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "biased"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=48, attention_bias=True)).save_pretrained(d)
    tok.save_pretrained(d)
    rc, err = _main(capsys, "--model", str(d), "--export", "gguf-q4_k_m", "--output-dir", str(tmp_path / "o"))
    assert rc == 2 and len(err) == 1 and "attention biases" in err[0] and "--export merged" in err[0], err
    assert not (tmp_path / "o" / "summary.json").exists()  # nothing was trained


def test_cli_bf16_on_a_gpu_without_it(tmp_path, capsys, monkeypatch):
    """--dtype bf16 where the GPU has no bf16 (simulated): one line that says to use fp16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    rc, err = _main(capsys, "--dtype", "bf16", "--output-dir", str(tmp_path / "o"))
    assert rc == 2 and len(err) == 1 and "Tesla T4" in err[0] and "--dtype fp16" in err[0], err


def test_flags_and_yaml_config(tmp_path):
    """--config run.yaml gives the same names as the flags (and TRL's: max_length, learning_rate); a flag given
    too wins."""
    import argparse

    from sloth.finetune.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert config_from_args(p.parse_args([])).method == "lora"
    for flag, method in (("--lora", "lora"), ("--qlora", "qlora"), ("--full", "full")):
        assert config_from_args(p.parse_args([flag])).method == method
    assert config_from_args(p.parse_args(["--export", "merged,gguf-q8_0,merged"])).exports == ("merged", "gguf-q8_0")
    y = tmp_path / "run.yaml"
    y.write_text("learning_rate: 1.0e-4\nmax_length: 256\nbatch-size: 2\nexport: merged,gguf\npacking: true\n")
    c = config_from_args(p.parse_args(["--config", str(y), "--batch-size", "3"]))
    assert (c.lr, c.max_seq_length, c.batch_size, c.exports, c.packing) == (1e-4, 256, 3, ("merged", "gguf"), True)
    y.write_text("learning_rat: 1\n")
    with pytest.raises(FinetuneError, match="unknown option 'learning_rat'"):
        config_from_args(p.parse_args(["--config", str(y)]))


def test_packing_and_resume(tmp_path):
    """--packing trains (padding-free rows); --save-steps writes checkpoints that --resume continues from."""
    r = finetune(quick(tmp_path, packing=True, save_steps=1, steps=2), log=lambda m: None)
    assert r.trainer.args.packing and r.summary["steps"] == 2
    assert os.path.isdir(tmp_path / "out" / "checkpoints" / "checkpoint-2")
    r2 = finetune(quick(tmp_path, packing=True, steps=3, resume="auto"), log=lambda m: None)
    assert r2.summary["steps"] == 3 and len(r2.summary["losses"]) == 1  # only step 3 ran


def test_eval_split_padding_free_and_full(tmp_path):
    """--eval-split logs (and plots) the eval loss; --padding-free trains without padding; --full trains every
    weight (the model saved whole, no adapter)."""
    r = finetune(quick(tmp_path, name="a", eval_split=0.25, padding_free=True), log=lambda m: None)
    assert r.trainer.args.padding_free and r.summary["eval_losses"] and r.summary["examples"] == 6
    assert "eval_loss" in open(tmp_path / "a" / "loss.csv").read().splitlines()[0]
    r = finetune(quick(tmp_path, name="b", method="full"), log=lambda m: None)
    assert r.summary["trainable_params"] == r.summary["total_params"]
    assert (tmp_path / "b" / "model.safetensors").is_file() and not (tmp_path / "b" / "adapter_config.json").exists()


def test_other_family_trains_and_exports(tmp_path, checkpoints):
    """A Qwen3 checkpoint (with its own tokenizer and chat template) trains on the stack and exports to GGUF."""
    gguf = pytest.importorskip("gguf")
    r = finetune(quick(tmp_path, model=checkpoints["qwen3"], exports=("gguf-q8_0",), lr=1e-3), log=lambda m: None)
    assert r.summary["sloth_patched_modules"] > 0 and r.summary["steps"] == 2
    f = gguf.GGUFReader(r.summary["exports"]["gguf-q8_0"]).fields
    assert f["general.architecture"].contents() == "qwen3"
