"""Measure an exported probe model through the product's own paths on a world of an unseen seed:
yes/no per kind (`mllm answer` + the exercise's scoring), and optionally descriptions (CHAIR) and grounding.

    .venv/bin/python docs/probes/evaluate.py model=runs/probe/s3a_model world=runs/probe/world_eval [describe=1] [ground=1]
"""
import json
import sys
from pathlib import Path

from mllm.course.shared import answer_yesno, describe_and_score, ground_and_score

args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
model, world = Path(args["model"]), Path(args.get("world", "runs/probe/world_eval"))
out = Path(args.get("out", str(model) + "_eval"))
out.mkdir(parents=True, exist_ok=True)
row = {"yesno": answer_yesno(model, world, out)}
kinds = json.loads((out / "yesno.json").read_text())["categories"]
row["yesno_kinds"] = {k: round(v["acc"], 3) for k, v in kinds.items()}
if args.get("describe") == "1":
    row["chair"] = describe_and_score(model, world, out, limit=int(args.get("limit", 100)))
if args.get("ground") == "1":
    row["grounding"] = ground_and_score(model, world, out, limit=int(args.get("limit", 100)))
print(json.dumps(row))
(out / "summary.json").write_text(json.dumps(row, indent=2) + "\n")
