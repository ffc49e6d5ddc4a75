"""`mllm demo`: arguments -> `mllm.course.demo.run_demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mllm.course.demo as demo

from mllm.cli.arguments import add_device_arguments, positive_int, runtime_of


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm demo", description=demo.__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped tiny model)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--seed", type=int, default=2026, help="seed of the fresh scenes (training used 0)")
    parser.add_argument("--n-eval", type=positive_int, default=60, help="held-out scenes for the scores")
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mllm.outputs import OutputDirError

    runtime = runtime_of(parser, args)
    try:
        report = demo.run_demo(args.model, args.out, args.seed, args.n_eval, runtime)
    except OutputDirError as err:
        print(f"mllm demo: {err}", file=sys.stderr)
        return 2
    print(f"\nreport: {report.resolve()}")
    return 0
