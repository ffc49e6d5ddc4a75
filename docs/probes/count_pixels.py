"""Can the base learn count from pixels at all, when asked nothing else? A tune-kind stage (`BaseStage`, vision and
LLM trained, images after the first question) from a finished base's model on yes/no questions of some kinds only,
no slot anchor, held-out per-kind curves (all four kinds: what the others lose).

    OMP_NUM_THREADS=1 nohup .venv/bin/python docs/probes/count_pixels.py base=runs/course14/base \
        model=runs/course14/base/model out=runs/probe/cp1 kinds=count steps=400 >> runs/cp1.log 2>&1 &

    kinds=count,existence,color,position (comma list), lr=3e-4, llm_scale=0.5, slot=0.0 (the slot regression's
    weight: 1.0 is tune's anchor, which asks each cell for its category's count word), turns=2, batch=32
"""
import sys
from pathlib import Path

import torch

from common import read_chain
from mllm.data.lessons import LessonMix
from mllm.model.checkpoint import load_state_dict
from mllm.train.base_recipe import BaseStage, StageSettings

args = dict(a.split("=", 1) for a in sys.argv[1:])
torch.set_num_threads(int(args.get("threads", 1)))
base = Path(args["base"])
model, tokenizer, slots = read_chain(base, [base / "read"], box_code=args.get("box_code", "number"))  # slots as read left them (frozen after it)
model.load_state_dict(load_state_dict(Path(args["model"])))
kinds = tuple(args.get("kinds", "count").split(","))
settings = StageSettings(kind="tune", steps=int(args.get("steps", 400)), lr=float(args.get("lr", 3e-4)),
                         trains={"vision": 1.0, "llm": float(args.get("llm_scale", 0.5))},
                         slot_weight=float(args.get("slot", 0.0)), readout_weight=0.0, warmup=20, beta2=0.98,
                         batch=int(args.get("batch", 32)), turns=int(args.get("turns", 2)), question_first=True,
                         mix=LessonMix(yesno=1.0, lookup=0.0, short=0.0, detailed=0.0, grounding=0.0,
                                       statements=False, yesno_kinds=kinds),
                         eval_scenes=int(args.get("eval_scenes", 300)), eval_every=int(args.get("eval_every", 100)),
                         describe_scenes=0, ground_scenes=0, save_every=50)
print(f"count_pixels.py: {args}", flush=True)
stage = BaseStage(model, tokenizer, slots, settings, Path(args["out"]))
print("before", stage.evaluate(), flush=True)
print(stage.run(), flush=True)
