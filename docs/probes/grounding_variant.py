"""The course's grounding stage from a finished course's base with settings `Budget` does not hold (the stage reads
them with defaults: grounding_lr, grounding_turns, grounding_mix, grounding_batch, grounding_minutes, ...).

    nohup .venv/bin/python docs/probes/grounding_variant.py from=runs/course13 out=runs/g_lr2 grounding_lr=2e-4 \
        >> runs/g_lr2.log 2>&1 &

`out` gets links to `from`'s world and base model (nothing of `from` is written) and the stage's own folder.
"""
import ast
import sys
from pathlib import Path

from mllm.course.grounding import course_stage
from mllm.course.shared import Budget

if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    source, out = Path(args.pop("from")).resolve(), Path(args.pop("out"))
    (out / "base").mkdir(parents=True, exist_ok=True)
    for link, target in ((out / "world", source / "world"), (out / "base" / "model", source / "base" / "model")):
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    budget = Budget()
    for name, value in args.items():
        setattr(budget, name, ast.literal_eval(value))
    print(f"grounding_variant.py: {args}", flush=True)
    result = course_stage(out, budget, 0)
    print({k: result[k] for k in ("before", "after", "train_minutes", "settings")}, flush=True)
