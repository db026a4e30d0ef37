"""`cascade-rt` command line: one sub-command per module in `cascade_rt.commands`.

Each command module defines `register(subparsers)`, which adds its parser and sets `func=handler`
(a callable taking the parsed namespace and returning an exit code). Adding a command = adding a module
here; this file never grows with command logic. Command modules import torch, the runtime and the export layer
inside their handlers, so that building the parser (`cascade-rt --help`) does not import torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cascade_rt.errors import CascadeError

COMMAND_MODULES = [
    "cascade_rt.commands.info",
    "cascade_rt.commands.bench",
    "cascade_rt.commands.generate",
    "cascade_rt.commands.reconstruct",
    "cascade_rt.commands.convert",
    "cascade_rt.commands.export",
    "cascade_rt.commands.engines",
    "cascade_rt.commands.serve",
    "cascade_rt.commands.bench_serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade-rt",
        description=(
            "Fast, faithful Stable Cascade (Wuerstchen v3) inference: eager reference, engines, kernels, benchmarks."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CascadeError as exc:  # expected, user-facing failures: message only, no traceback
        print(f"cascade-rt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
