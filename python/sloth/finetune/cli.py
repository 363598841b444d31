"""The arguments of `sloth finetune` and its entry point (one-line errors, no tracebacks, for user mistakes)."""

from __future__ import annotations

import argparse
import os
import sys

from .config import DTYPES, METHODS, FinetuneConfig
from .errors import FinetuneError

PROG = "sloth finetune"


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
    """The options of `sloth finetune`."""
    d = FinetuneConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="local path or hub id (in the local cache) of a causal LM; default: a tiny "
                   "random-weight Llama built on the fly")
    g.add_argument("--dataset", help=".json / .jsonl / .parquet file or a `datasets` hub name; default: the bundled "
                   "instruction data")
    g.add_argument("--dataset-split", default=d.dataset_split, help="split of a hub dataset (default: %(default)s)")
    g.add_argument("--instruction-column", default=d.instruction_column, help="(default: %(default)s)")
    g.add_argument("--input-column", default=d.input_column, help="optional extra prompt text (default: %(default)s)")
    g.add_argument("--output-column", default=d.output_column, help="the response (default: %(default)s)")
    g.add_argument("--messages-column", default=d.messages_column,
                   help="a column of chat turns [{role, content}], used when present (default: %(default)s)")
    g.add_argument("--chat-template", help="Jinja chat template: a file path or the template itself; default: the "
                   "tokenizer's own (sloth's simple one if it has none)")
    g.add_argument("--max-seq-length", type=_positive_int, default=d.max_seq_length,
                   help="truncate examples to this many tokens (default: %(default)s)")
    g = p.add_argument_group("method")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--method", choices=METHODS, default=d.method, help="(default: %(default)s; qlora needs a CUDA "
                   "GPU and bitsandbytes)")
    m.add_argument("--lora", dest="method", action="store_const", const="lora", help="same as --method lora")
    m.add_argument("--qlora", dest="method", action="store_const", const="qlora", help="same as --method qlora")
    m.add_argument("--full", dest="method", action="store_const", const="full", help="same as --method full")
    g.add_argument("--r", type=_positive_int, default=d.r, help="LoRA rank (default: %(default)s)")
    g.add_argument("--lora-alpha", type=_positive_float, default=d.lora_alpha, help="(default: %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, help=f"optimizer steps (default: {FinetuneConfig.DEFAULT_STEPS} "
                   "unless --epochs is given)")
    g.add_argument("--epochs", type=_positive_float, help="passes over the data (when --steps is not given)")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="examples per micro-batch "
                   "(default: %(default)s)")
    g.add_argument("--grad-accum", type=_positive_int, default=d.grad_accum, help="micro-batches per optimizer "
                   "step (default: %(default)s)")
    g.add_argument("--lr", type=_positive_float, help="peak learning rate (default: 2e-3 for the bundled model, "
                   "2e-4 otherwise)")
    g.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    g.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="compute dtype (default: auto = bf16 on a GPU "
                   "that has it, fp32 on the CPU)")
    g.add_argument("--output-dir", default=d.output_dir, help="where the adapter, tokenizer, loss.png and "
                   "summary.json go (default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("export")
    g.add_argument("--export", type=_exports, default=(), metavar="FORMATS",
                   help="after training, also write these comma-separated formats into the output directory: "
                   "merged (bf16 safetensors with the adapter merged; merged-fp16, merged-fp32), gguf-q8_0, gguf-f16, "
                   "gguf-bf16 (llama.cpp / Ollama, with a Modelfile; Llama-architecture models)")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The FinetuneConfig of parsed arguments."""
    return FinetuneConfig(
        model=args.model, dataset=args.dataset, dataset_split=args.dataset_split,
        instruction_column=args.instruction_column, input_column=args.input_column,
        output_column=args.output_column, messages_column=args.messages_column, chat_template=args.chat_template,
        method=args.method, r=args.r, lora_alpha=args.lora_alpha, max_seq_length=args.max_seq_length,
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        output_dir=args.output_dir, seed=args.seed, dtype=args.dtype, progress=not args.quiet,
        exports=tuple(args.export))


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
    print(f"sloth finetune: {s['steps']} steps in {s['wall_time_s']:.1f} s, {loss_txt}, "
          f"{s['tokens_per_s']:,.0f} tok/s; {what}, tokenizer, loss.png and summary.json in {result.output_dir}",
          file=sys.stderr)
    for fmt, path in s.get("exports", {}).items():
        print(f"sloth finetune: {fmt}: {path}", file=sys.stderr)
    return 130 if s["interrupted"] else 0
