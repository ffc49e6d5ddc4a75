"""`mllm course`: arguments -> a `Budget` -> `mllm.course.runner.run` (imported only when a stage runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

import mllm.course
from mllm.course.shared import STAGES, Budget


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm course", description=mllm.course.__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=STAGES + ["all"], default="all")
    parser.add_argument("--out", type=Path, default=Path("runs/course"))
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run of every stage")
    parser.add_argument("--preference-pairs", choices=["self", "world"], default="self",
                        help="preference stage: pairs from the base model's own descriptions (judged against "
                             "the scenes) or the world's synthetic corrupted descriptions")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budget = Budget.quick() if args.quick else Budget()
    budget.preference_pairs = args.preference_pairs
    import mllm.course.runner

    mllm.course.runner.run(args.out, args.stage, budget, args.seed)
    return 0
