"""The arguments of `sloth finetune` and its entry point (one-line errors, no tracebacks, for user mistakes).
Options come from the flags, or from ``--config run.yaml`` (the same names); a flag wins over the file."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .config import DTYPES, METHODS, FinetuneConfig, read_yaml
from .errors import FinetuneError

PROG = "sloth finetune"
S = argparse.SUPPRESS  # flags not given stay out of the namespace (the YAML file / defaults fill them)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _exports(s: str):
    from .export import parse_exports

    try:
        return parse_exports(s)
    except FinetuneError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--export: ", "")) from None


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``sloth finetune: error: ... (see sloth finetune --help)``."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `sloth finetune` (defaults shown are FinetuneConfig's)."""
    d = FinetuneConfig()
    p.add_argument("--config", default=S, metavar="RUN.YAML", help="read options from a YAML file (the same names "
                   "as the flags, e.g. `lr: 2e-4`, `max_seq_length: 512`); flags given too win")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=S, help="local path or hub id (in the local cache) of a Llama / Qwen3 / "
                   "Mistral / Gemma 3 causal LM; default: a tiny random-weight Llama built on the fly")
    g.add_argument("--dataset", default=S, help=".json / .jsonl / .parquet file or a `datasets` hub name; default: "
                   "the bundled instruction data")
    g.add_argument("--dataset-split", default=S, help=f"split of a hub dataset (default: {d.dataset_split})")
    g.add_argument("--eval-split", type=_positive_float, default=S, metavar="FRACTION",
                   help="hold out this fraction of the rows and report the eval loss (default: none)")
    g.add_argument("--instruction-column", default=S, help=f"(default: {d.instruction_column})")
    g.add_argument("--input-column", default=S, help=f"optional extra prompt text (default: {d.input_column})")
    g.add_argument("--output-column", default=S, help=f"the response (default: {d.output_column}); rows without "
                   "one are skipped and counted")
    g.add_argument("--messages-column", default=S, help="a column of chat turns [{role, content}], used when present; "
                   f"the last assistant turn is learned (default: {d.messages_column})")
    g.add_argument("--chat-template", default=S, help="Jinja chat template: a file path or the template itself; "
                   "default: the tokenizer's own (sloth's simple one if it has none)")
    g.add_argument("--max-seq-length", type=_positive_int, default=S,
                   help=f"truncate examples to this many tokens (default: {d.max_seq_length})")
    g.add_argument("--packing", action="store_true", default=S, help="pack examples into full rows (TRL's "
                   "best-fit packing, padding-free)")
    g.add_argument("--padding-free", action="store_true", default=S, help="concatenate each batch into one row, no "
                   "padding (without --packing, examples are not truncated)")
    g = p.add_argument_group("method")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--method", choices=METHODS, default=S, help=f"(default: {d.method}; qlora needs a CUDA GPU and "
                   "bitsandbytes)")
    m.add_argument("--lora", dest="method", action="store_const", const="lora", default=S, help="same as --method lora")
    m.add_argument("--qlora", dest="method", action="store_const", const="qlora", default=S,
                   help="same as --method qlora")
    m.add_argument("--full", dest="method", action="store_const", const="full", default=S, help="same as --method full")
    g.add_argument("--r", type=_positive_int, default=S, help=f"LoRA rank (default: {d.r})")
    g.add_argument("--lora-alpha", type=_positive_float, default=S, help=f"(default: {d.lora_alpha})")
    g.add_argument("--gradient-checkpointing", choices=("sloth", "true", "false"), default=S,
                   help="sloth: offloaded (default); true: Transformers' own; false: none")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=S, help=f"optimizer steps (default: "
                   f"{FinetuneConfig.DEFAULT_STEPS} unless --epochs is given)")
    g.add_argument("--epochs", type=_positive_float, default=S, help="passes over the data (when --steps is not given)")
    g.add_argument("--batch-size", type=_positive_int, default=S, help=f"examples per micro-batch (default: "
                   f"{d.batch_size})")
    g.add_argument("--grad-accum", type=_positive_int, default=S, help=f"micro-batches per optimizer step (default: "
                   f"{d.grad_accum})")
    g.add_argument("--lr", type=_positive_float, default=S, help="peak learning rate (default: 2e-3 for the bundled "
                   "model, 2e-4 otherwise)")
    g.add_argument("--seed", type=int, default=S, help=f"(default: {d.seed})")
    g.add_argument("--dtype", choices=DTYPES, default=S, help="compute dtype (default: auto = bf16 on a GPU that has "
                   "it, fp32 on the CPU)")
    g.add_argument("--output-dir", default=S, help=f"where the adapter, tokenizer, loss.png, loss.csv and "
                   f"summary.json go (default: {d.output_dir})")
    g.add_argument("--overwrite", action="store_true", default=S, help="replace an earlier run in --output-dir (its "
                   "adapter, plot, summary, merged/, gguf/, checkpoints/)")
    g.add_argument("--save-steps", type=_positive_int, default=S, help="write a checkpoint every N steps into "
                   "<output-dir>/checkpoints (for --resume)")
    g.add_argument("--resume", nargs="?", const="auto", default=S, metavar="CHECKPOINT",
                   help="continue from the last checkpoint in <output-dir>/checkpoints, or from CHECKPOINT")
    g.add_argument("--report-to", default=S, help="Transformers' report_to: none (default), tensorboard, wandb, ...")
    g.add_argument("--quiet", action="store_true", default=S, help="no progress bar")
    g.add_argument("--verbose", action="store_true", default=S, help="show the libraries' own logs and warnings")
    g = p.add_argument_group("export")
    g.add_argument("--export", type=_exports, default=S, metavar="FORMATS",
                   help="after training, also write these comma-separated formats into the output folder: merged "
                   "(bf16 safetensors with the adapter merged; merged-fp16, merged-fp32), gguf-q4_k_m (= gguf), "
                   "gguf-q5_k_m, gguf-q6_k, gguf-q4_0, gguf-q8_0, gguf-f16, gguf-bf16 (llama.cpp / Ollama, with a "
                   "Modelfile; Llama, Mistral, Qwen3, Gemma 3)")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The FinetuneConfig of parsed arguments: defaults, then the ``--config`` file, then the flags given."""
    values = {}
    given = vars(args)
    if "config" in given:
        values.update(read_yaml(given["config"]))
    rename = {"export": "exports"}
    for k, v in given.items():
        if k == "config":
            continue
        if k == "quiet":
            values["progress"] = not v
            continue
        values[rename.get(k, k)] = v
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    if "exports" in values:
        values["exports"] = tuple(values["exports"])
    return FinetuneConfig(**{k: v for k, v in values.items() if k in names})


def run(args: argparse.Namespace) -> int:
    """Run `sloth finetune` with parsed arguments; a FinetuneError becomes a one-line message and exit code 2."""
    try:
        config = config_from_args(args).validate()
        if config.dataset is not None and not os.path.exists(config.dataset) and \
                os.path.splitext(config.dataset)[1].lower() in (".json", ".jsonl", ".parquet"):
            raise FinetuneError(f"dataset file {config.dataset!r} not found; pass an existing .json, .jsonl or "
                                f".parquet file to --dataset (or leave it out for the bundled data)")
        from .train import finetune

        result = finetune(config)
    except FinetuneError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    s = result.summary
    first, last = s["initial_loss"], s["final_loss"]
    loss_txt = f"loss {first:.4f} -> {last:.4f}" if first is not None else "no step finished"
    what = "adapter" if config.method != "full" else "model"
    plot = "loss.png, " if s.get("loss_plot") else ""
    print(f"sloth finetune: {s['steps']} steps in {s['wall_time_s']:.1f} s, {loss_txt}, "
          f"{s['tokens_per_s']:,.0f} tok/s; {what}, tokenizer, {plot}loss.csv and summary.json in {result.output_dir}",
          file=sys.stderr)
    return 130 if s["interrupted"] else 0
