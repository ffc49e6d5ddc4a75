"""Can the finished base learn to count from pixels? The shipped base answers a count question as if every category
it sees were there once (seed 7070's 1,500 fresh scenes: 575 of 588 questions about a category there once right,
26 of 138 about one there twice, and 11 of 101 "exactly k" questions true for a k of two or more): its image tokens
were aligned to slots holding a count word that the tower cannot see ("Stop 47": patches of a category there twice
say "twice" at ~0.05). Here the base goes on from pixels as `tune` does (its pointer and match heads, lm 0.5),
without the slot regression (no slot tables ship): a share `count` of the steps asks count questions (three a
conversation) and the statements turn alone, as read's conversations, the other steps the four kinds with
descriptions and boxes beside them (asked=0: the count steps with the writing turns too, where a conversation's
one-token answers are a few of its ~100 answer tokens). Per-kind held-out accuracy from pixels, greedy descriptions
and boxes every eval_every steps, in the stage's log.

    OMP_NUM_THREADS=1 nohup .venv/bin/python docs/probes/count_polish.py out=runs/cp1 [start=mllm/assets/tiny-base \
        steps=600 lr=2e-4 vision=0 count=0.5 asked=1 detailed=0.4 grounding=0.4] > runs/cp1.log 2>&1 &

vision=1 trains the vision tower and resampler too (at lr, the LLM at lr as well).
"""
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch

from mllm.course.base import _slots, base_stages
from mllm.course.shared import Budget
from mllm.data.lessons import LessonMix
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer
from mllm.train.base_recipe import BaseStage

if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    start, out = Path(args.get("start", "mllm/assets/tiny-base")), Path(args["out"])
    torch.set_num_threads(int(args.get("threads", "1")))
    budget = Budget()
    model, tokenizer = MLLMModel.from_pretrained(start), load_tokenizer(start)
    slots = _slots(tokenizer, model, 0, budget.box_code)  # unused tables: no slot loss here
    count = float(args.get("count", "0.5"))
    # the other steps: any of the four kinds, the statements turn, descriptions and boxes
    mix = LessonMix(yesno=1.0, lookup=0.0, short=0.0, detailed=float(args.get("detailed", "0.4")),
                    grounding=float(args.get("grounding", "0.4")), alone=float(args.get("alone", "0.3")),
                    caption_noise=budget.caption_noise)
    # count steps: count questions and the statements alone (as read's conversations), or with the writing turns too
    # (asked=0): there a conversation's one-token answers are a few of its ~100 answer tokens
    count_mix = replace(mix, yesno_kinds=("count",)) if args.get("asked", "1") == "0" else \
        LessonMix(yesno=1.0, lookup=0.0, short=0.0, detailed=0.0, grounding=0.0, yesno_kinds=("count",))
    tune = base_stages(budget)[-1]
    trains = {"llm": 1.0, "vision": 1.0} if args.get("vision", "0") == "1" else {"llm": 1.0}
    settings = replace(tune, name="count", steps=int(args.get("steps", "600")), lr=float(args.get("lr", "2e-4")),
                       trains=trains, slot_weight=0.0, readout_weight=0.0, box_readout_weight=0.0, warmup=30,
                       eval_every=int(args.get("eval_every", "100")), eval_scenes=int(args.get("eval_scenes", "200")),
                       mix=mix, slot_counts=False)
    stage = BaseStage(model, tokenizer, slots, settings, out / "count", seed=int(args.get("seed", "5")))
    stage.lesson_at = lambda step: (count_mix if random.Random(step).random() < count else mix, settings.turns)
    print(stage.run(progress=lambda line: print(line, flush=True)), flush=True)
