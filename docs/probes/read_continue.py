"""Continue finished read-kind stages (or start from a run's random init) on one lesson mix, through the product's
`BaseStage`, one thread: the curriculum probes of docs/probes/README.md.

    .venv/bin/python docs/probes/read_continue.py base=RUN/base from=FOLDER[,FOLDER...]|init mix=NAME \
        steps=300 lr=5e-4 out=runs/probe/NAME [statements=1 eval_every=100 eval_scenes=300 warmup=20]
        [order=band | table=triple|rank]

    c1  from=runs/course/base/read mix=colour            (then `bind` in the product)
    c2  from=runs/course/base/read,runs/probe/c1 mix=full steps=250   (then `settle`)
    p1  from=...,runs/probe/c2 mix=position
    p2  from=...,runs/probe/c2 mix=where lr=1e-3 statements=0
    l1  from=RUN/base/read,RUN/base/bind,RUN/base/settle mix=lookup
    w1  from=RUN/base/read,...,RUN/base/resettle mix=describe        (w2: alone=1 statements=0)
    w1b from= as w1 + runs/probe/w1, mix=describe
    w3  from= as w1, mix=full alone=0.5
    w4  as w1 with order=band (the slots band-major, `common.band_major_slots`)
    t1  from=RUN/base/read,...,RUN/base/resettle table=triple mix=full   (t1b: + runs/probe/t1; t2: + t1b, mix=position)
    r1  from= as w1, table=rank mix=describe
    k1  from= as w1, order=compact mix=describe   (the occupied slots first, in description order)
    n1  from= as w1, mix=describe max_objects=3   (a curriculum's first step: the transitions 1 -> 2 -> 3 alone)
    d0  from=init mix=describe alone=1 statements=0 steps=400 lr=1e-3 warmup=50 eval_every=200 eval_scenes=100
    g1  from= as w1 + grow:4 mix=describe   (the LLM deepened to 8 layers first, `common.grow_llm`)
    d0L from=init mix=describe alone=1 statements=0 steps=500 lr=1e-3 warmup=50   (d0L_1; d0L_2: from=init,...d0L_1)
    e1  from=init,runs/probe/d0L_1,runs/probe/d0L_2 mix=full alone=0.3 lr=5e-4   (descriptions first, then the full mix)
    e4  from= as e1, mix=existence_desc lr=1e-3 warmup=50   (then existence questions, descriptions kept)
    e4b from= as e1 + runs/probe/e4, mix=existence_desc steps=400 lr=1e-3 warmup=50
    e5  from= as e4b + runs/probe/e4b, mix=full alone=0.3 lr=1e-3 warmup=50
    b1  from= as e5 + runs/probe/e5, mix=colour_desc lr=5e-4   (bind's colour questions, descriptions kept)
    b2  from= as e5 + runs/probe/e5, mix=lookup_desc lr=5e-4   (lookup's open questions, descriptions kept)
    b3  from= as e5 + runs/probe/e5, mix=colour lr=5e-4   (bind's colour questions as run 4's bind had them)
    e6  from= as e5 + runs/probe/e5, mix=full alone=0.3 steps=500 lr=1e-3 warmup=50   (more of the full mix)
    t0  from=init mix=describe alone=1 statements=0 steps=500 lr=1e-3 warmup=50 tie=1   (d0L_1 with tied embeddings)
    e3  from= as e1, mix=existence steps=500 lr=1e-3 warmup=50   (existence questions alone: the walk is lost)
    q0  from=init mix=yesno turns=2 steps=1000 lr=1e-3 warmup=50 eval_every=250 eval_scenes=100   (one question + statements)
    q1  as q0 with layout=qfirst   (the image after the first question: each slot can match the question itself)
    m1  as q1 with match=1.0 match_layer=2   (each image position supervised: does it answer the question)
    m2  as m1 with turns=1 statements=0   (the question alone)
    m3  from=init,runs/probe/m1 mix=full alone=0.3 layout=qfirst match=1.0 freeze_slots=1 steps=300 lr=5e-4
        (the full mix on top: descriptions, lookups, grounding; slots frozen so that docs/probes/pixels.py can align
        the vision side to m1's slots meanwhile)
    j1  from=init mix=yesno_desc turns=2 layout=qfirst match=1.0 steps=1000 lr=1e-3 warmup=50 eval_every=250
        eval_scenes=100   (the course's read with descriptions kept: does the walk come beside the questions?)
    p1  from=RUN/base/read mix=full alone=0.3 layout=qfirst match=1.0 pointer=1.0 freeze_slots=1 steps=400
        (the course's settle with the pointer head: does a supervised pointer find the next object?)
    gp1 as p1 with boxes=1   (grounding answers point at the referred object's cell too)
    ap2 as gp1 with attend=1 pointer_layer=2   (the pointer is the LLM's own attention: layer 2, head 0; ap3: layer 3)
    ar2 from=RUN/base/read,runs/probe/ap2, as ap2 with read=1.0 steps=300   (ap2b: the same without read=)
    f2  from=RUN/base/read, as ap2 with read=1.0 read_box=1.0 box_code=fourier steps=400 (the box as digit phases;
        fb2: the same with the bins)
    g1  from=RUN/base/read,runs/probe/fb2 as fb2 with mix=ground steps=150 (f2g: from f2, box_code=fourier)
    g2  as g1 with first_head=2   (head 2 of layer 2 reads x0's leading digit from the cell, a sink elsewhere)
    n1  as g1 with numbers=1 roles=3:0,3:1,3:2,3:3 steps=300   (each coordinate one token, read by a head of
        layer 3 that attends to the cell only where it is written; n2: roles=2:2,2:3,3:2,3:3; n2c: from=...,n2 with
        steps=400; n4: n2 from RUN/base/read,runs/probe/f2 with box_code=fourier). n1, n2 and n4 ran with the
        probe's own copy of the role losses (number_tokens.role_heads, commit 5bd8401: the roles' attention added to
        the pointer loss, their read in place of read_box); now `roles=` sets the stage's box_role_weight = 1 and
        box_heads (`stage_heads.box_role_losses`, the same losses, logged as box_attend and box_read)
    br2 as ar2 with read_box=1.0   (each box digit from head 0's output and the position's state, through layer 2)
    sg1 base=runs/course10/base from=RUN/base/read mix=full alone=0.3 grounding=1.0 layout=qfirst match=1.0
        freeze_slots=1 roles=2:2,2:3,3:2,3:3 steps=700   (course10's settle with the grounding turns weighed 1.0; sg2:
        the same with the slots trained; sg3: from=RUN/base/read,RUN/base/settle mix=ground turns=8 steps=400;
        sg4: as sg3 with mix=full alone=0 grounding=3.0 steps=200)
    nc3 base=runs/course11/base from=RUN/base/read slots_code=number code_norm=2.0 mix=full alone=0.3 grounding=1.0
        turns=8 layout=qfirst match=1.0 freeze_slots=1 roles=2:2,2:3,3:2,3:3 steps=300   (course11's settle with the
        LM head's number code at a trained row's norm: `slots_code=number` builds the product's number-code slots;
        nc4: from=RUN/base/read,runs/probe/nc3 slots_code=number mix=ground turns=8 ... steps=150, grounding alone
        after it; nc5: from=...,runs/probe/nc4 with nc3's mix, steps=100 lr=3e-4: the yes/no brought back)
    nc1 as sg3 with box_code=number   (stop 41: the slots' box part and the LM head's number rows as one smooth code,
        `common.number_code`; `code_head=0` keeps the LM head as loaded)
    f0  from=init mix=lookup steps=600 lr=1e-3 statements=0 warmup=50 eval_every=200 eval_scenes=100   (f1: statements=1)

order=band: the slots band-major, as descriptions name objects (`common.band_major_slots`). table=triple|rank: one
more learnt vector in each object's slot (`common.extra_slot_table`), added to the finished chain. triple, one per
(colour, category, 3x3 place): position questions need the asked pair and its place matched in one slot, as colour
questions needed the pair (`SceneSlots.colour_category`). rank, the object's ordinal in description order at a word
embedding's scale: does it stop descriptions from slots repeating one object?
"""
import dataclasses
import sys
from pathlib import Path

import torch

from common import band_major_slots, compact_slots, extra_slot_table, first_digit_head, read_chain
from mllm.data.lessons import (COLOUR_NEXT, EXISTENCE_FIRST, LOOKUP_ONLY, QUESTIONS_AND_STATEMENTS, LessonMix,
                                with_descriptions)
from mllm.train.base_recipe import BaseStage, StageSettings

args = dict(a.split("=", 1) for a in sys.argv[1:])
torch.set_num_threads(1)
base = Path(args["base"])
if args.get("order") == "band":  # w4: the slots in the order descriptions name objects
    band_major_slots()
elif args.get("order") == "compact":  # k1: the occupied slots first, in description order
    compact_slots()
if "table" in args:
    std = 0.0  # triple: zero-initialised
    if args["table"] == "rank":  # at the scale of a word: the input embeddings of the run's phase 0 (read's start)
        from mllm.model.modeling_mllm import MLLMModel
        std = float(MLLMModel.from_pretrained(base / "phase0").llm.get_input_embeddings().weight.detach().std())
    extra_slot_table(args["table"], std)
if "max_objects" in args:  # n1: scenes of at most this many objects (the stage's own yes/no evaluation too)
    from functools import partial

    from mllm.world import scenes as S
    S.sample_scene = partial(S.sample_scene, max_objects=int(args["max_objects"]))
statements = args.get("statements", "1") == "1"
only = {"yesno": 0.0, "lookup": 0.0, "short": 0.0, "detailed": 0.0, "grounding": 0.0}
mixes = {
    # sg1: grounding=W weighs the grounding turns W (0.25 in the course's settle)
    "full": LessonMix(statements=statements, alone=float(args.get("alone", 0.0)),
                      grounding=float(args.get("grounding", 0.25))),
    "colour": LessonMix(**only | {"yesno": 1.0}, yesno_kinds=("color",), statements=statements),
    "position": LessonMix(**only | {"yesno": 1.0}, yesno_kinds=("position",), statements=statements),
    "lookup": LessonMix(**only | {"lookup": 1.0}, statements=statements),
    "where": LessonMix(**only | {"yesno": 0.5, "lookup": 0.5}, yesno_kinds=("position",), statements=statements),
    "describe": LessonMix(**only | {"short": 0.33, "detailed": 0.67}, statements=statements,
                          alone=float(args.get("alone", 0.0))),
    "yesno": LessonMix(**only | {"yesno": 1.0}, statements=statements),  # q0/q1: yes/no questions of all kinds
    "ground": LessonMix(**only | {"grounding": 1.0}, statements=False),  # g1: grounding only
    # j1: the course's read (stop 35) with descriptions kept: 30 % one description alone, some after the statements
    "yesno_desc": with_descriptions(QUESTIONS_AND_STATEMENTS, float(args.get("alone", 0.3))),
    "existence": EXISTENCE_FIRST,  # read's first curriculum step: existence questions + the inventory turn
    # ... with descriptions kept (e4): a share alone, asked first, and some after the questions
    "existence_desc": dataclasses.replace(EXISTENCE_FIRST, short=0.1, detailed=0.2,
                                          alone=float(args.get("alone", 0.3))),
    # bind's colour questions and lookup's open questions with descriptions kept the same way (b1, b2)
    "colour_desc": dataclasses.replace(COLOUR_NEXT, short=0.1, detailed=0.2, alone=float(args.get("alone", 0.3))),
    "lookup_desc": dataclasses.replace(LOOKUP_ONLY, short=0.1, detailed=0.2, alone=float(args.get("alone", 0.3))),
}
chain = "init" if args["from"] == "init" else args["from"].split(",")
fourier = args.get("box_code") == "fourier"  # f2: each box coordinate's digits as phases, in place of the bins
numbered = []  # n2c: folders trained with number tokens, loaded after the tokens are added
if args.get("numbers") == "1" and chain != "init":
    import json
    numbered = [f for f in chain if (Path(f) / "model" / "config.json").is_file()
                and json.loads((Path(f) / "model" / "config.json").read_text())["vocab_size"] > 1000]
    chain = [f for f in chain if f not in numbered]
model, tokenizer, slots = read_chain(base, chain[:1] if fourier else chain, box_code=args.get("slots_code", "bins"))
if "code_norm" in args:  # nc3: a course run's number rows (box_code=number) with the code scaled to this norm
    from common import number_rows_at
    before = number_rows_at(model, tokenizer, float(args["code_norm"]))
    print("number rows: code %.3f, shared offset %.3f before" % before, flush=True)
if fourier:  # the first folder's slots (bins), then the new box part seeded, then the later (fourier) folders
    from mllm.train.scene_slots import SceneSlots
    torch.manual_seed(0)
    coded = SceneSlots(tokenizer, model.config.llm.hidden_size, slots.grid, box_code="fourier")
    coded.load_state_dict(slots.state_dict(), strict=False)  # all but the new box part (seeded above)
    slots = coded
    finished = StageSettings(kind="read", steps=1, lr=1e-3, trains={"llm": 1.0, "slots": 1.0}, eval_scenes=1)
    for folder in chain[1:]:
        BaseStage(model, tokenizer, slots, finished, Path(folder)).load_finished()
if args.get("numbers") == "1":  # n1/n2: every box coordinate one token (docs/probes/number_tokens.py)
    from number_tokens import add_number_tokens
    add_number_tokens(model, tokenizer)
    for folder in numbered:
        BaseStage(model, tokenizer, slots, StageSettings(kind="read", steps=1, lr=1e-3, trains={"llm": 1.0},
                                                         eval_scenes=1), Path(folder)).load_finished()
if args.get("box_code") == "number":  # nc1: the box as the number tokens' own smooth code (common.number_code)
    from common import number_code
    print("number code: gamma %.3f, alpha %s" % number_code(model, tokenizer, slots,
                                                            head_rows=args.get("code_head", "1") == "1"), flush=True)
if args.get("tie") == "1":  # t0: the LM head tied to the input embeddings (a word held in a slot reads straight out)
    model.llm.lm_head.weight = model.llm.get_input_embeddings().weight
    save_pretrained = model.save_pretrained

    def save_untied(path, **kwargs):  # safetensors refuses shared tensors: save a copy as the head (equal values)
        tied = model.llm.lm_head.weight
        model.llm.lm_head.weight = torch.nn.Parameter(tied.detach().clone())
        try:
            save_pretrained(path, **kwargs)
        finally:
            model.llm.lm_head.weight = tied

    model.save_pretrained = save_untied
settings = StageSettings(kind="read", steps=int(args.get("steps", 300)), lr=float(args.get("lr", 5e-4)),
                         trains={"llm": 1.0} if args.get("freeze_slots") == "1" else {"llm": 1.0, "slots": 1.0},
                         lm_weight=1.0, warmup=int(args.get("warmup", 20)), beta2=0.95, batch=32,
                         eval_scenes=int(args.get("eval_scenes", 300)), eval_every=int(args.get("eval_every", 100)),
                         save_every=50, mix=mixes[args["mix"]], turns=int(args.get("turns", 4)),
                         # q1: the image after the first question; m1: each image position told whether it answers it
                         question_first=args.get("layout") == "qfirst", match_weight=float(args.get("match", 0.0)),
                         match_layer=int(args.get("match_layer", 2)),
                         # p1: each description token points at the cell of the object its sentence is about
                         pointer_weight=float(args.get("pointer", 0.0)),
                         pointer_layer=int(args.get("pointer_layer", 2)),
                         pointer_boxes=args.get("boxes") == "1",  # gp1: grounding answers point at their object
                         # ap2 / ap3: the pointer taught to head 0 of decoder layer pointer_layer itself
                         pointer_attention=args.get("attend") == "1",
                         read_weight=float(args.get("read", 0.0)),  # ar2: the next object word from that head alone
                         box_read_weight=float(args.get("read_box", 0.0)),  # br2: box digits, through the layer
                         # n1/n2: the box's k-th number read by query head (layer, head) number k of this list
                         **({"box_role_weight": 1.0, "box_heads": tuple(tuple(int(v) for v in r.split(":"))
                                                                       for r in args["roles"].split(","))}
                            if "roles" in args else {}))
stage = BaseStage(model, tokenizer, slots, settings, Path(args["out"]))
if "first_head" in args:  # g2: head N of the pointer's layer reads the first corner's leading digit alone
    first_digit_head(stage, int(args["first_head"]), settings.pointer_layer)
print(stage.run(progress=lambda s: print(s, flush=True)))
