"""Teacher-forced box digits of a finished read-kind stage (the scene as slots), one thread: for every digit of a
grounding answer's box, by coordinate (x0, y0, x1, y1) and place (hundreds, tens, units), how often the LLM's most
likely next token is that digit, against the most common digit of that role in the same answers (the prior), and
the weight head 0 of decoder layer L gives the referred object's cell from the position that predicts it, and
whether head 0's output there holds the digit: a linear classifier per role fitted on its first 3/4 (head 0's
value read, 64 wide), accuracy on the rest; the same from the cell's slot vector and from its state at layer L
(256 wide each):

    .venv/bin/python docs/probes/box_digits.py RUN/base STAGE_FOLDER... [layer=2] [n=200] [box_code=fourier]
"""
import random
import sys
from collections import Counter
from pathlib import Path

import torch

from common import read_chain
from mllm.data.lessons import grounding_turn
from mllm.train.base_recipe import BaseStage, StageSettings, collate
from mllm.train.scene_slots import SceneSlots
from mllm.train.stage_heads import pointer_targets
from mllm.world import scenes as S

torch.set_num_threads(1)
options = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
base, *folders = [a for a in sys.argv[1:] if "=" not in a]
layer, n = int(options.get("layer", 2)), int(options.get("n", 200))
fourier = options.get("box_code") == "fourier"
model, tokenizer, slots = read_chain(base, folders[:1] if fourier else folders[:-1])
if fourier:  # the later folders' slots hold the Fourier box part (their first, the read, the bins)
    slots = SceneSlots(tokenizer, model.config.llm.hidden_size, slots.grid, box_code="fourier")
settings = StageSettings(kind="read", steps=1, lr=1e-3, trains={"llm": 1.0, "slots": 1.0}, eval_scenes=1,
                         question_first=True)
for folder in folders[1:] if fourier else folders[-1:]:
    stage = BaseStage(model, tokenizer, slots, settings, Path(folder))
    stage.load_finished()
model.eval()
rng = random.Random(7919)
scenes, conversations = [], []
while len(scenes) < n:
    scene = S.drawn_scene(S.sample_scene(rng, f"digits{len(scenes)}"))
    turn = grounding_turn(scene, rng)
    if turn is not None:
        scenes.append(scene)
        conversations.append([turn])
names = [f"{c}{p}" for c in ("x0", "y0", "x1", "y1") for p in ("h", "t", "u")]
right, total, weight, truth = Counter(), Counter(), Counter(), {name: Counter() for name in names}
reads = {name: [] for name in names}  # (head 0's output [hd], digit) per role
slot_reads = {name: [] for name in names}  # (the cell's slot vector [D], digit)
cell_reads = {name: [] for name in names}  # (the cell's state at layer L [D], digit)
attention = model.llm.model.layers[layer].self_attn
hd = attention.head_dim
with torch.no_grad():
    for start in range(0, n, 20):
        chunk, talks = scenes[start:start + 20], conversations[start:start + 20]
        batch = collate([stage._encode(c) for c in talks], stage.pad_id)
        tokens, _ = stage._image_tokens(chunk, None)
        out = stage._forward(batch, tokens, hidden_states=True)
        hidden = model.llm.model.layers[layer].input_layernorm(out.hidden_states[layer])
        T = hidden.shape[1]
        cos, sin = model.llm.model.rotary_emb(torch.arange(T)[None], hidden.dtype)
        _, weights = attention(hidden, cos, sin, batch["attention_mask"][:, None, None, :].bool()
                               & torch.ones(T, T).tril().bool(), False, eager=True)  # (B, nh, T, T)
        values = attention.v_proj(hidden)[..., :hd]  # (B, T, hd): value head 0
        read = torch.einsum("bts,bsd->btd", weights[:, 0], values)  # (B, T, hd): head 0's output
        for b, (scene, talk) in enumerate(zip(chunk, talks)):
            ids = batch["input_ids"][b].tolist()
            targets = pointer_targets(scene, talk, ids, tokenizer, slots.grid, boxes=True)
            text = talk[0][1]  # "[x0,y0,x1,y1]"
            roles = []
            for k, value in enumerate(text.strip("[]").split(",")):
                places = "htu"[3 - len(value):]
                roles += [f"{'xyxy'[k]}{k // 2}{place}" for place in places]
            digits = [(p, cell) for p, cell in targets if tokenizer.decode([ids[p + 1]]).isdigit()]
            for (position, cell), role in zip(digits, roles):
                digit = tokenizer.decode([ids[position + 1]])
                total[role] += 1
                truth[role][digit] += 1
                right[role] += int(out.logits[b, position].argmax()) == ids[position + 1]
                weight[role] += float(weights[b, 0, position, int(batch["image_starts"][b]) + cell])
                reads[role].append((read[b, position], int(digit)))
                slot_reads[role].append((tokens[b, cell], int(digit)))
                cell_reads[role].append((out.hidden_states[layer][b, int(batch["image_starts"][b]) + cell], int(digit)))


def linear_accuracy(pairs) -> float:
    """A 10-way linear classifier fitted (LBFGS, small L2) on the first 3/4 of `pairs`, accuracy on the rest."""
    x = torch.stack([v for v, _ in pairs]).float()
    y = torch.tensor([d for _, d in pairs])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    cut = 3 * len(pairs) // 4
    classifier = torch.nn.Linear(x.shape[1], 10)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(classifier(x[:cut]), y[:cut]) + 1e-3 * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float((classifier(x[cut:]).argmax(-1) == y[cut:]).float().mean())

print(f"{'role':5} {'n':>4} {'acc':>6} {'prior':>6} {'head0 on cell':>14} {'linear from head 0':>19} "
      f"{'slot':>6} {'cell':>6}")
for role in names:
    if total[role]:
        prior = truth[role].most_common(1)[0][1] / total[role]
        print(f"{role:5} {total[role]:4d} {right[role] / total[role]:6.3f} {prior:6.3f} "
              f"{weight[role] / total[role]:14.3f} {linear_accuracy(reads[role]):19.3f} "
              f"{linear_accuracy(slot_reads[role]):6.3f} {linear_accuracy(cell_reads[role]):6.3f}")
