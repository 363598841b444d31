"""The `sloth` command line."""

from __future__ import annotations

import argparse
import sys

FINETUNE_DESCRIPTION = ("Fine-tune a causal LM with LoRA / QLoRA / full fine-tuning on sloth's kernels "
                        "(sloth.from_pretrained, sloth.get_peft_model, TRL's SFTTrainer). With no arguments: a tiny "
                        "bundled Llama on bundled instruction data (CPU when there is no GPU).")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["finetune"]:  # its own parser, so that every error is one `sloth finetune: error:` line
        from .finetune.cli import PROG, OneLineParser, add_arguments, run

        ft = OneLineParser(prog=PROG, description=FINETUNE_DESCRIPTION)
        add_arguments(ft)
        return run(ft.parse_args(argv[1:]))
    parser = argparse.ArgumentParser(prog="sloth", description="sloth: faster, smaller fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, compiled backends and architectures, GPUs, and the kernels of each op")
    sub.add_parser("finetune", help="fine-tune a causal LM (default: a tiny bundled model on bundled data; "
                   "sloth finetune --help)", add_help=False)
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import collect, format_info

        print(format_info(collect()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
