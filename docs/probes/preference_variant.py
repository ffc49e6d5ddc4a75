"""`mllm course`'s preference stage from a finished course's base with settings `Budget` does not hold:
`key=value` pairs override `preference.stage_settings` (pair_mode, pair_samples, steps, lr, beta, yesno_anchors, ...).
The base, world and the stage's fresh scenes are linked from `from`.

    OMP_NUM_THREADS=2 nohup .venv/bin/python docs/probes/preference_variant.py from=runs/course16 out=runs/pref1 \
        pair_mode='"absent"' pair_samples=4 >> runs/pref1.log 2>&1 &
"""
import ast
import json
import sys
from pathlib import Path

from mllm.course import preference as P
from mllm.course.shared import Budget

if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    source, out = Path(args.pop("from")).resolve(), Path(args.pop("out"))
    (out / "base").mkdir(parents=True, exist_ok=True)
    (out / "preference").mkdir(exist_ok=True)
    links = [(out / "world", source / "world"), (out / "base" / "model", source / "base" / "model")]
    if "pair_images" not in args:  # more images than `from`'s: the stage generates its own
        links.append((out / "preference" / "fresh_scenes", source / "preference" / "fresh_scenes"))
    for link, target in links:
        if not link.exists():
            link.symlink_to(target)
    overrides = {name: ast.literal_eval(value) for name, value in args.items()}
    budget = Budget()
    for name, value in overrides.items():  # a setting the stage reads with a default (tune_vision)
        P.STAGE.setdefault(name, value)
    for name, value in overrides.items():
        setattr(budget, f"preference_{name}", value)
    print(f"preference_variant.py: {P.stage_settings(budget)}", flush=True)
    result = P.course_stage(out, budget)
    (out / "preference_result.json").write_text(json.dumps(result, indent=1, default=str))
    print("\n".join(result["table_rows"]), flush=True)
