"""The `sloth` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sloth", description="sloth: faster, smaller fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, compiled backends and architectures, GPUs, and the kernels of each op")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import collect, format_info

        print(format_info(collect()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
