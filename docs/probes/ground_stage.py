"""Grounding Acc@0.5 of finished base stages, as each stage's evaluation now measures it (`BaseStage.ground`), on
more held-out scenes, one thread:

    .venv/bin/python docs/probes/ground_stage.py RUN/base slots STAGE_FOLDER...   (read-kind stages: from slots)
    .venv/bin/python docs/probes/ground_stage.py RUN/base pixels MODEL_DIR         (align / tune: from pixels)

n=100 scenes by default (n=...). Prints the score and the first answers beside the truth.
"""
import sys
from pathlib import Path

import torch

from common import read_chain
from mllm.course.base import _slots
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer
from mllm.train.base_recipe import BaseStage, StageSettings

torch.set_num_threads(1)
options = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
base, source, *folders = [a for a in sys.argv[1:] if "=" not in a]
n = int(options.get("n", 100))
if source == "slots":
    model, tokenizer, slots = read_chain(base, folders)
    kind = "read"
else:
    model, tokenizer = MLLMModel.from_pretrained(folders[0]), load_tokenizer(folders[0])
    slots, kind = _slots(tokenizer, model, 0), "tune"
settings = StageSettings(kind=kind, steps=1, lr=1e-3, trains={"llm": 1.0}, eval_scenes=1, describe_scenes=0,
                         ground_scenes=n, question_first=bool(model.config.question_first))
stage = BaseStage(model, tokenizer, slots, settings, Path("unused"))
original = stage._greedy
shown = []


def greedy(prompt, scenes, images, max_new_tokens):
    texts = original(prompt, scenes, images, max_new_tokens)
    if len(shown) < 6:
        shown.append(f"{prompt} -> {texts[0].strip()}")
    return texts


stage._greedy = greedy
print(stage.ground())
for k, line in enumerate(shown):
    print(line, "| truth", stage.ground_heldout[k][3])
