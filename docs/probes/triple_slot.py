"""Probe: one more learnt vector in each object's slot (`common.extra_slot_table`), added to a finished chain of
read-kind stages, which then goes on on one lesson mix (one thread).

    .venv/bin/python docs/probes/triple_slot.py base=RUN/base from=FOLDER[,FOLDER...] table=triple|rank \
        mix=full|position|describe steps=300 lr=5e-4 out=runs/probe/NAME

    t1   from=RUN/base/read,.../bind,.../settle,.../lookup,.../resettle table=triple mix=full
    t1b  from= the same + runs/probe/t1
    t2   from= as t1b + runs/probe/t1b, table=triple mix=position
    r1   from= as t1, table=rank mix=describe

triple: position questions ("Is the red moon in the top left of the image?") stayed at chance (.50-.58) through
every read-kind stage, although "Where is the red moon?" reads the place back at .46-.55: the answer needs the pair
and the place matched in one slot, and the LLM's attention from the answer position is spread over every slot.
A (colour, category, place) vector makes that one key, as `SceneSlots.colour_category` did for colour binding.
rank: descriptions from perfect slots repeat one object ("a red ring, a red ring and a red ring"); does the
object's ordinal in description order (first .. sixth, at a word embedding's scale) in its slot stop that?
"""
import sys
from pathlib import Path

import torch

from common import extra_slot_table, read_chain
from mllm.data.lessons import LessonMix
from mllm.train.base_recipe import BaseStage, StageSettings

args = dict(a.split("=", 1) for a in sys.argv[1:])
torch.set_num_threads(int(args.get("threads", 1)))
table = args.get("table", "triple")
base = Path(args["base"])
std = 0.0
if table == "rank":  # at the scale of a word: the LLM's input embeddings of the run's phase 0 (its LLM is read's start)
    from mllm.model.modeling_mllm import MLLMModel
    std = float(MLLMModel.from_pretrained(base / "phase0").llm.get_input_embeddings().weight.std())
extra_slot_table(table, std)
model, tokenizer, slots = read_chain(base, args["from"].split(","))
only = {"yesno": 0.0, "lookup": 0.0, "short": 0.0, "detailed": 0.0, "grounding": 0.0}
mixes = {"full": LessonMix(),
         "describe": LessonMix(**only | {"short": 0.33, "detailed": 0.67}),
         "position": LessonMix(**only | {"yesno": 1.0}, yesno_kinds=("position",))}
settings = StageSettings(kind="read", steps=int(args.get("steps", 300)), lr=float(args.get("lr", 5e-4)),
                         trains={"llm": 1.0, "slots": 1.0}, lm_weight=1.0, warmup=20, beta2=0.95, batch=32,
                         eval_scenes=300, eval_every=int(args.get("eval_every", 100)), save_every=50,
                         mix=mixes[args["mix"]])
print(BaseStage(model, tokenizer, slots, settings, Path(args["out"])).run(progress=lambda s: print(s, flush=True)))
