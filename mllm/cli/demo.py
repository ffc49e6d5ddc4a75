"""`mllm demo`: arguments -> `mllm.course.demo.run_demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mllm.course.demo as demo

from mllm.cli.arguments import positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm demo", description=demo.__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the shipped tiny model)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--seed", type=int, default=2026, help="seed of the fresh scenes (training used 0)")
    parser.add_argument("--n-eval", type=positive_int, default=60, help="held-out scenes for the scores")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mllm.outputs import OutputDirError

    try:
        report = demo.run_demo(args.model, args.out, args.seed, args.n_eval)
    except OutputDirError as err:
        print(f"mllm demo: {err}", file=sys.stderr)
        return 2
    print(f"\nreport: {report.resolve()}")
    return 0
