"""Can the LLM count the cells it flags? The course's `read` stage (the random LLM and the slot tables, questions
and statements, the match head) with slots that hold no count word: a count question ("Are there exactly two
circles?") can then only be answered by counting the cells of that category, which from pixels is what the image
tokens give (they hold what a cell shows, never how many of its category the image has: count read back at its
prior after align and tune, "Stop 46"). Per-kind held-out accuracy from slots every eval_every steps, in the
stage's own log.

    OMP_NUM_THREADS=1 nohup .venv/bin/python docs/probes/count_from_flags.py from=runs/course18 out=runs/countflags \
        [steps=1000 counts=0] > runs/countflags.log 2>&1 &

counts=1 keeps the count word (the course's read stage, the baseline); the tokenizer and random init are `from`'s.
start=runs/course18/base/ground [lr=5e-4]: the LLM and slot tables of that finished stage instead of a random LLM,
the LLM alone trained (the slots frozen, as after read), on the same questions and statements; writing=1: with
ground's writing turns in the same conversations (4 turns: questions, statements, descriptions and boxes).
"""
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from mllm.course.base import _fresh_model, _slots, base_stages
from mllm.course.shared import Budget
from mllm.data.lessons import LessonMix
from mllm.model.modeling_mllm import MLLMModel
from mllm.train.base_recipe import BaseStage

if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    source, out = Path(args["from"]), Path(args["out"])
    torch.set_num_threads(1)
    if not (out / "init").is_dir():
        shutil.copytree(source / "base" / "init", out / "init")
    budget = Budget()
    model, tokenizer = _fresh_model(source / "world", out / "init", 0, budget.whole_numbers, budget.box_code)
    slots = _slots(tokenizer, model, 0, budget.box_code)
    settings = replace(base_stages(budget)[0], steps=int(args.get("steps", budget.read_steps)),
                       slot_counts=args.get("counts", "0") == "1")
    if "start" in args:
        model = MLLMModel.from_pretrained(Path(args["start"]) / "model")
        slots.load_state_dict(load_file(str(Path(args["start"]) / "slots.safetensors")))
        settings = replace(settings, trains={"llm": 1.0}, lr=float(args.get("lr", 5e-4)))
    if args.get("writing", "0") == "1":
        settings = replace(settings, turns=4, mix=LessonMix(yesno=1.0, lookup=0.0, short=0.0, detailed=0.4,
                                                            grounding=1.0, alone=0.3))
    print(BaseStage(model, tokenizer, slots, settings, out / "read", seed=0).run(
        progress=lambda line: print(line, flush=True)), flush=True)
