"""Run the product's align and tune stages (`mllm.train.base_recipe`) on top of a stage-1 probe checkpoint, so a
probe's LLM continues through the very code `mllm course --stage base` runs.

    .venv/bin/python docs/probes/recipe_stages.py read=runs/probe/d1b.pt out=runs/probe/r1 align=500 tune=1000 \
        [align_lr=1e-3 tune_lr=3e-4 llm_scale=0.5 batch=32 threads=1 vision=mllm/assets/tiny-base noise=0.25
         readout=1 align_answer=0 (r2: align_answer=1 readout=0) vision_stage=ANOTHER_RUN/align]

The probe's LLM and oracle tables become a finished `read` stage folder (model/, slots.safetensors, done.json);
the vision tower comes from `vision=` (the shipped base's: the course's phase-0 stand-in, trained).
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mllm.course.base import SLOT_GRID, base_config
from mllm.data.lessons import LessonMix
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer
from mllm.train.base_recipe import BaseStage, StageSettings
from mllm.train.scene_slots import SceneSlots

args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
torch.set_num_threads(int(args.get("threads", 1)))
out = Path(args["out"])
vision_from = Path(args.get("vision", "mllm/assets/tiny-base"))
tokenizer = load_tokenizer("mllm/assets/tiny-base")  # the probes' tokenizer
torch.manual_seed(0)
model = MLLMModel(base_config(tokenizer))
slots = SceneSlots(tokenizer, model.config.llm.hidden_size, SLOT_GRID)
read = out / "read"
if not (read / "done.json").is_file():
    state = torch.load(args["read"])
    model.llm.load_state_dict(state["llm"])
    oracle = state["oracle"]
    slots.load_state_dict({"cell.weight": oracle["pos.weight"], "colour_category.weight": oracle["cs.weight"],
                           "box.weight": oracle["box.weight"]})
    shipped = load_file(str(vision_from / "model.safetensors"))
    print(model.vpm.load_state_dict({k[4:]: v for k, v in shipped.items() if k.startswith("vpm.")}))
    read.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(read / "model", tokenizer=tokenizer)
    save_file(slots.state_dict(), str(read / "slots.safetensors"))
    (read / "done.json").write_text(json.dumps({"stage": "read", "from_probe": args["read"], "step": state["step"],
                                                "cpu_minutes": float(args.get("read_cpu_minutes", 0.0))}))
if args.get("vision_stage") and not (out / "align" / "done.json").is_file():
    # the vision side of another run's finished align stage (aligned to an earlier stage-1 LLM), no align here
    aligned = load_file(str(Path(args["vision_stage"]) / "model" / "model.safetensors"))
    model.load_state_dict({**model.state_dict(), **{k: v for k, v in aligned.items() if not k.startswith("llm.")}})
    model.save_pretrained(read / "model", tokenizer=tokenizer)
    args["align"] = "0"
common = {"batch": int(args.get("batch", 32)), "eval_scenes": int(args.get("eval_scenes", 300)),
          "eval_every": int(args.get("eval_every", 250)), "save_every": 50}
stages = [
    StageSettings(kind="read", steps=0, lr=0.0, trains={"llm": 1.0, "slots": 1.0}),  # finished above: loads them
    StageSettings(kind="align", steps=int(args.get("align", 500)), lr=float(args.get("align_lr", 1e-3)),
                  trains={"vision": 1.0}, answer_weight=float(args.get("align_answer", 0.0)), slot_weight=1.0,
                  readout_weight=float(args.get("readout", 1.0)), warmup=50, beta2=0.98, **common),
    StageSettings(kind="tune", steps=int(args.get("tune", 1000)), lr=float(args.get("tune_lr", 3e-4)),
                  trains={"vision": 1.0, "llm": float(args.get("llm_scale", 0.5))}, lm_weight=0.5, slot_weight=1.0,
                  readout_weight=float(args.get("readout", 1.0)),
                  warmup=50, beta2=0.98, mix=LessonMix(caption_noise=float(args.get("noise", 0.25))), **common),
]
for settings in stages:
    if settings.steps == 0 and settings.kind != "read":
        continue
    print(BaseStage(model, tokenizer, slots, settings, out / settings.kind).run(progress=lambda s: print(s, flush=True)),
          flush=True)
shutil.copytree(out / "tune" / "model", out / "model", dirs_exist_ok=True)
print("model:", out / "model")
