"""Teacher-forced box numbers by role (x0, y0, x1, y1) after a number-token run (n1, n2, ...: number_tokens.py).

    .venv/bin/python docs/probes/number_roles.py base=runs/course7/base from=FOLDER,... roles=2:2,2:3,3:2,3:3 \
        [box_code=fourier|number] [slots_code=number] [n=300] [no_box=1] [vision=RUN/base/align]

Per role, on n fresh grounding prompts (one grounding turn each, the image after the question): the model's own
number (argmax over the 1000 number tokens at the role's position) against the truth: exact, within 25 and 50 of
it, mean absolute error; the prior's (the role's most common number band) for scale; the role head's attention
weight on the referred cell; and Acc@0.5 of the box the four teacher-forced numbers make. `vision=FOLDER`: the
scenes rendered and read through that finished stage's vision tower and resampler instead of the slots.
"""
import json
import random
import sys
from pathlib import Path

import torch

from common import read_chain
from number_tokens import add_number_tokens
from mllm.data.boxes import iou
from mllm.data.lessons import fresh_scene, grounding_turn
from mllm.model.tokenization import split_numbers
from mllm.train.base_recipe import BaseStage, StageSettings, collate
from mllm.train.stage_heads import head_scores, pointer_targets, whole_number_ids

args = dict(a.split("=", 1) for a in sys.argv[1:])
torch.set_num_threads(1)
chain = args["from"].split(",")
numbered = [f for f in chain if json.loads((Path(f) / "model" / "config.json").read_text())["vocab_size"] > 1000]
fourier = args.get("box_code") == "fourier"
plain = [f for f in chain if f not in numbered]
# slots_code=number: a course run built with Budget.box_code="number" (its slots hold the product's code; nc3, nc4)
model, tokenizer, slots = read_chain(args["base"], plain[:1] if fourier else plain,
                                     box_code=args.get("slots_code", "bins"))
if fourier:  # the later folders' slots hold the Fourier box code: loaded over the converted slots below
    from mllm.train.scene_slots import SceneSlots
    coded = SceneSlots(tokenizer, model.config.llm.hidden_size, slots.grid, box_code="fourier")
    coded.load_state_dict(slots.state_dict(), strict=False)
    slots = coded
settings = StageSettings(kind="read", steps=1, lr=1e-3, trains={"llm": 1.0, "slots": 1.0}, eval_scenes=1,
                         question_first=True)
for folder in plain[1:] if fourier else []:
    BaseStage(model, tokenizer, slots, settings, Path(folder)).load_finished()
if split_numbers(tokenizer):  # a chain trained with digits: the number tokens added here (n1, n2, ...)
    number_ids = add_number_tokens(model, tokenizer)
else:  # a course run built with whole numbers (course10): already one token each
    number_ids = dict(enumerate(whole_number_ids(tokenizer).tolist()))
for folder in numbered:
    BaseStage(model, tokenizer, slots, settings, Path(folder)).load_finished()
if args.get("box_code") == "number":  # nc1: the slots' box part as the number code (the LM head as trained)
    from common import number_code
    number_code(model, tokenizer, slots, head_rows=False)
if args.get("no_box") == "1":  # stop 40: the slots' box part set to zero: do the role heads read it at all?
    slots._box_part = lambda scenes, bins: torch.zeros(len(bins), model.config.llm.hidden_size)
if "vision" in args:  # stop 41: from pixels, through a finished align or tune stage's vision tower and resampler
    from mllm.train.base_recipe import vision_tokens
    from mllm.world import scenes as S

    BaseStage(model, tokenizer, slots, StageSettings(kind="align", steps=1, lr=1e-3, trains={"vision": 1.0},
                                                     eval_scenes=1), Path(args["vision"])).load_finished()
stage = BaseStage(model, tokenizer, slots, settings, Path("/tmp/number_roles_unused"))
roles = [tuple(int(v) for v in r.split(":")) for r in args["roles"].split(",")]
numbers = torch.tensor([number_ids[n] for n in range(1000)])
model.eval()
rng = random.Random(int(args.get("seed", 777)))
rows = {k: [] for k in range(4)}  # role -> [(predicted, true, head weight on the cell)]
boxes = []
with torch.no_grad():
    for i in range(int(args.get("n", 300))):
        if "vision" in args:
            image, scene = S.render_scene(S.sample_scene(rng, "lesson"))
        else:
            scene = fresh_scene(rng)
        turn = grounding_turn(scene, rng)
        if turn is None:
            continue
        batch = collate([stage._encode([turn])], stage.pad_id)
        tokens = vision_tokens(model, stage.processor, [image]) if "vision" in args \
            else slots([scene], model.llm.get_input_embeddings().weight)
        out = stage._forward(batch, tokens, hidden_states=True)
        ids = batch["input_ids"][0].tolist()
        role_positions = []
        for position, cell in pointer_targets(scene, [turn], ids, tokenizer, slots.grid, True):
            if ids[position + 1] in number_ids.values() and len(role_positions) < 4:
                role_positions.append((position, cell))
        if len(role_positions) < 4:
            continue
        predicted = []
        for k, (position, cell) in enumerate(role_positions):
            logits = out.logits[0, position, numbers]
            guess, truth = int(logits.argmax()), int(tokenizer.decode([ids[position + 1]]))
            layer_index, head = roles[k]
            x = model.llm.model.layers[layer_index].input_layernorm(out.hidden_states[layer_index])
            scores = head_scores(model.llm, layer_index, x, batch, torch.tensor([0]), torch.tensor([position]), head)
            weight = float(scores.softmax(-1)[0, int(batch["image_starts"][0]) + cell])
            rows[k].append((guess, truth, weight))
            predicted.append(guess)
        truth_box = [rows[k][-1][1] for k in range(4)]
        boxes.append(iou(predicted, truth_box) if predicted[2] > predicted[0] and predicted[3] > predicted[1] else 0.0)
names = ("x0", "y0", "x1", "y1")
print(f"{len(boxes)} prompts; teacher-forced box Acc@0.5 {sum(b >= 0.5 for b in boxes) / len(boxes):.3f}, "
      f"mean IoU {sum(boxes) / len(boxes):.3f}")
for k in range(4):
    guess, truth, weight = (torch.tensor(v, dtype=torch.float32) for v in zip(*rows[k]))
    error = (guess - truth).abs()
    prior = (truth - truth.median()).abs()
    print(f"{names[k]}: exact {float((error == 0).float().mean()):.3f}, within 25 {float((error <= 25).float().mean()):.3f}"
          f" (prior {float((prior <= 25).float().mean()):.3f}), within 50 {float((error <= 50).float().mean()):.3f} "
          f"(prior {float((prior <= 50).float().mean()):.3f}), MAE {float(error.mean()):.1f} "
          f"(prior {float(prior.mean()):.1f}); head {roles[k]} on the cell {float(weight.mean()):.3f}")
