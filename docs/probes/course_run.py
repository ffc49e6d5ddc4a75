"""One course stage under a Budget with some fields changed: the whole-course runs of docs/probes/README.md
(course7, course10, ...), resumable (rerun the same line). Fields are Budget's own; values are read as Python
literals (True, 1.0, 700, (2, 3)).

    nohup .venv/bin/python docs/probes/course_run.py out=runs/course10 whole_numbers=True box_role_weight=1.0 \
        settle_steps=700 [stage=base seed=0] >> runs/course10.log 2>&1 &

Runs under runs/ are not kept from one session's checkout to the next: a base (~80 minutes on two idle cores) is
started and finished in one session. Run nothing else on the cores meanwhile: align and tune use both, and a
one-thread probe beside them slowed align six-fold (stop 40).
"""
import ast
import dataclasses
import sys
from pathlib import Path

from mllm.course import runner
from mllm.course.shared import Budget


if __name__ == "__main__":  # the base's read-kind stages run in a spawned process, which imports this file again
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    out, stage, seed = Path(args.pop("out")), args.pop("stage", "base"), int(args.pop("seed", "0"))
    fields = {f.name for f in dataclasses.fields(Budget)}
    unknown = sorted(set(args) - fields)
    if unknown:
        sys.exit(f"course_run.py: {unknown} are not Budget fields (Budget has {sorted(fields)})")
    budget = Budget(**{name: ast.literal_eval(value) for name, value in args.items()})
    print(f"course_run.py: {budget}", flush=True)
    runner.run(out, stage, budget, seed)
