"""From slots to pixels through the product's own stages: phase 0's vision tower, a fresh resampler (as the course
starts alignment), the LLM and slot tables of finished read-kind probe stages, then `align` (vision regresses the
slots, LLM frozen) and optionally `tune` (everything), with the image after the first question and the match head.

    .venv/bin/python docs/probes/pixels.py phase0=runs/course6/base/phase0 from=init,runs/probe/m1 \
        out=runs/probe/a1 align=600 [tune=300 match=1.0 eval_scenes=100 eval_every=200] [box_code=number]

    a11  phase0=runs/course11/base/phase0 from=runs/course11/base/read box_code=number align=3000 eval_every=500
         (course11's align, one thread, with the box read-back inside the words' (4 of 7 terms; code of 16:40);
         a11b: box_readout=0.25, the read-back a loss of its own, align=1500; a11c: box_readout=1.0)
"""
import sys
from pathlib import Path

import torch

from common import read_chain
from mllm.course.base import _fresh_resampler
from mllm.data.lessons import LessonMix
from mllm.model.modeling_mllm import MLLMModel
from mllm.train.base_recipe import BaseStage, StageSettings

args = dict(a.split("=", 1) for a in sys.argv[1:])
torch.set_num_threads(int(args.get("threads", 1)))
out = Path(args["out"])
phase0 = Path(args["phase0"])
# init's LLM, then the folders' over it; box_code=number: a course run with Budget.box_code="number" (stop 41, a11)
model, tokenizer, slots = read_chain(phase0.parent, args["from"].split(","), box_code=args.get("box_code", "bins"))
vision = MLLMModel.from_pretrained(phase0)
model.vpm.load_state_dict(vision.vpm.state_dict())
_fresh_resampler(model, 0)
common = {"eval_scenes": int(args.get("eval_scenes", 100)), "eval_every": int(args.get("eval_every", 200)),
          "save_every": 50, "question_first": True}
match = float(args.get("match", 1.0))
stages = [StageSettings(kind="align", steps=int(args.get("align", 600)), lr=1e-3, trains={"vision": 1.0},
                        answer_weight=0.0, slot_weight=1.0, readout_weight=1.0, warmup=50, beta2=0.98,
                        box_readout_weight=float(args.get("box_readout", 0.0)), **common)]
if int(args.get("tune", 0)):
    stages.append(StageSettings(kind="tune", steps=int(args["tune"]), lr=float(args.get("tune_lr", 3e-4)),
                                trains={"vision": 1.0, "llm": 0.5}, lm_weight=0.5, slot_weight=1.0,
                                readout_weight=1.0, warmup=50, beta2=0.98, match_weight=match,
                                mix=LessonMix(caption_noise=0.25, alone=0.3), **common))
for k, settings in enumerate(stages):
    print(BaseStage(model, tokenizer, slots, settings, out / settings.label, after=stages[:k])
          .run(progress=lambda line: print(line, flush=True)), flush=True)
