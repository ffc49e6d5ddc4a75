"""The base's polish rounds from a finished course's `tune` with round settings `Budget` does not hold (stop 44):
`key=value` pairs override `polish.round_settings` (box_anchors, yesno_anchors, steps, lr, beta, ...), and
`rounds=N` the number of rounds. The rounds describe the same scenes as the course's own (same seed).

    nohup .venv/bin/python docs/probes/polish_variant.py from=runs/course14 out=runs/pv1 box_anchors=0.17 \
        >> runs/pv1.log 2>&1 &
"""
import ast
import sys
from dataclasses import replace
from pathlib import Path

from mllm.course import polish as P
from mllm.course.shared import Budget

if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    source, out = Path(args.pop("from")), Path(args.pop("out"))
    budget = replace(Budget(), polish_rounds=int(args.pop("rounds", "2")))
    overrides = {name: ast.literal_eval(value) for name, value in args.items()}
    defaults = P.round_settings
    P.round_settings = lambda b, r=1: defaults(b, r) | overrides
    print(f"polish_variant.py: {P.round_settings(budget)}", flush=True)
    model, curve = P.polish(source / "base" / "tune" / "model", source / "world", out / "polish", budget, 0)
    print({"model": str(model), "curve": curve}, flush=True)
