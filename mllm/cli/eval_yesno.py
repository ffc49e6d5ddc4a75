"""`mllm eval yesno`: arguments -> `mllm.eval.yesno.score`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mllm.eval import yesno
from mllm.jsonio import read_jsonl, write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mllm eval yesno", description=yesno.__doc__.split("\n")[0])
    p.add_argument("--answers", required=True, help="answers jsonl from `mllm answer`")
    p.add_argument("--test", help="test.json (id, image, conversations, category?) giving targets and images")
    p.add_argument("--out", required=True, help="result JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    numbered, skipped = read_jsonl(args.answers)
    answers = [record for _, record in numbered]
    if args.test:
        records, problems = yesno.join_with_test(answers, json.loads(Path(args.test).read_text()))
    else:
        records, problems = yesno.records_from_answers(answers)
    for entry in skipped:
        print(f"yesno: skipped line {entry['line']}: {entry['reason']}", file=sys.stderr)
    for problem, count in problems.items():
        if count:
            print(f"yesno: warning: {count} answer(s) with {problem.replace('_', ' ')}", file=sys.stderr)
    try:
        result = yesno.score(records)
    except ValueError as err:
        print(f"mllm eval yesno: {err}", file=sys.stderr)
        return 2
    result.update(skipped=skipped, join_problems=problems, answers=str(args.answers))
    write_json_atomic(args.out, result)
    print(yesno.format_table(result))
    return 0

