"""Stop 41: can the tiny vision side see a box to IoU 0.5 at all? From a finished course's vision tower and resampler,
a linear head on the image token of each object's cell regresses the object's box (L1 on the 0-1000 grid / 1000),
fresh rendered scenes every step, one thread; held-out MAE per coordinate and Acc@0.5 of the regressed boxes.

    .venv/bin/python docs/probes/box_pixels.py model=runs/course10/base/align/model out=runs/probe/bp1 \
        [steps=300 lr=1e-3 frozen=0 eval_every=100 eval_scenes=200]

`fresh_resampler=1` starts the resampler afresh, as the course's align does. `frozen=1` trains the head alone (what
the aligned tokens hold as they are). `tap=patches`: the head reads the vision tower's own output at the patch
holding the object's centre, before the resampler (is the resampler the bottleneck?); `tap=neighbours`: the resampler's
tokens of the cell's 3 x 3 neighbourhood side by side (is the box spread over the cells around it?).

    bp3  model=runs/course10/base/tune/model steps=2000 eval_every=500 tap=patches
    bp4  model=runs/course10/base/tune/model steps=2000 eval_every=500
    bp6  as bp4 with fresh_resampler=1;  bp7: as bp6 with tap=neighbours;  bp8: as bp6 with queries=64
"""
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mllm.data.boxes import iou, pixel_to_grid
from mllm.model.image_processing import ImageProcessor
from mllm.model.modeling_mllm import MLLMModel
from mllm.train.base_recipe import vision_tokens
from mllm.train.scene_slots import slot_features
from mllm.world import scenes as S

args = dict(a.split("=", 1) for a in sys.argv[1:])
torch.set_num_threads(1)
torch.manual_seed(0)
model = MLLMModel.from_pretrained(args["model"])
processor = ImageProcessor.from_config(model.config.slice)
if "queries" in args:  # bp8: a fresh resampler of this many queries (a square grid of cells), e.g. 64 = 8 x 8
    model.config.query_num = int(args["queries"])
    model.resampler = MLLMModel(model.config).resampler
if args.get("fresh_resampler") == "1":  # as the course's align starts (`_fresh_resampler`)
    from mllm.course.base import _fresh_resampler
    _fresh_resampler(model, 0)
grid = int(model.config.query_num ** 0.5)
patches, neighbours = args.get("tap") == "patches", args.get("tap") == "neighbours"
width = model.config.vision.hidden_size if patches else model.config.llm.hidden_size * (9 if neighbours else 1)
head = torch.nn.Linear(width, 4)
with torch.no_grad():  # start at the middle of the frame: the bias would take ~500 steps of lr 1e-3 to get there
    head.bias.fill_(0.5)
    head.weight.mul_(0.1)
frozen = args.get("frozen", "0") == "1"
vision = list(model.vpm.parameters()) + list(model.resampler.parameters())
for p in model.llm.parameters():
    p.requires_grad_(False)
for p in vision:
    p.requires_grad_(not frozen)
steps, lr = int(args.get("steps", 300)), float(args.get("lr", 1e-3))
optimizer = torch.optim.AdamW([{"params": head.parameters(), "lr": lr}]
                              + ([] if frozen else [{"params": vision, "lr": lr}]), weight_decay=0.0)
schedule = torch.optim.lr_scheduler.LambdaLR(  # warm-up, then cosine to zero
    optimizer, lambda s: min((s + 1) / 30, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))


def batch_of(rng, n):
    pairs = [S.render_scene(S.sample_scene(rng, "lesson")) for _ in range(n)]
    rows, cells, boxes = [], [], []
    for i, (_, scene) in enumerate(pairs):
        for obj, features in zip(scene.objects, slot_features(scene, grid)):
            rows.append(i), cells.append(features[0])
            boxes.append(pixel_to_grid(obj.bbox, scene.width, scene.height, square_pad=False))
    return [image for image, _ in pairs], torch.tensor(rows), torch.tensor(cells), torch.tensor(boxes).float()


def patch_features(images, rows, boxes):
    """The vision tower's output at the patch holding each box's centre: [N, Dv]."""
    from mllm.model.vision import pack_patch_strips
    views = [processor(image) for image in images]
    strips = [v["pixel_values"][0] for v in views]
    sizes = torch.tensor([[int(x) for x in v["tgt_sizes"][0]] for v in views], dtype=torch.int32)
    packed, mask = pack_patch_strips(strips)
    features = model.vpm(packed, mask, sizes)  # (B, N_max, Dv)
    h, w = sizes[rows, 0], sizes[rows, 1]
    cy, cx = (boxes[:, 1] + boxes[:, 3]) / 2000, (boxes[:, 0] + boxes[:, 2]) / 2000
    index = (cy * h).long().clamp(max=h - 1) * w + (cx * w).long().clamp(max=w - 1)
    return features[rows, index]


def predict(images, rows, cells, boxes):
    if patches:
        return head(patch_features(images, rows, boxes).float()) * 1000
    tokens = vision_tokens(model, processor, images)  # (B, Q, D)
    if neighbours:  # the cell's 3 x 3 neighbourhood of tokens side by side, zeros beyond the grid's edge
        padded = F.pad(tokens.reshape(len(images), grid, grid, -1), (0, 0, 1, 1, 1, 1))  # (B, G+2, G+2, D)
        r, c = cells // grid + 1, cells % grid + 1
        around = [padded[rows, r + dr, c + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)]  # 9 x (N, D)
        return head(torch.cat(around, -1).float()) * 1000
    return head(tokens[rows, cells].float()) * 1000  # (N, 4)


def evaluate(n):
    rng = random.Random(4242)
    model.eval()
    errors, ious = [], []
    with torch.no_grad():
        for _ in range(n // 25):
            images, rows, cells, boxes = batch_of(rng, 25)
            guess = predict(images, rows, cells, boxes)
            errors.append((guess - boxes).abs())
            ious += [iou(g.tolist(), b.tolist()) if g[2] > g[0] and g[3] > g[1] else 0.0 for g, b in zip(guess, boxes)]
    model.train()
    errors = torch.cat(errors)
    return {"mae": [round(float(v), 1) for v in errors.mean(0)],
            "acc05": round(sum(v >= 0.5 for v in ious) / len(ious), 3),
            "iou": round(sum(ious) / len(ious), 3), "objects": len(ious)}


out = Path(args["out"])
out.mkdir(parents=True, exist_ok=True)
rng, curve, start = random.Random(0), [], time.process_time()
eval_every, eval_scenes = int(args.get("eval_every", 100)), int(args.get("eval_scenes", 200))
curve.append({"step": 0, **evaluate(eval_scenes)})
print(curve[-1], flush=True)
for step in range(1, steps + 1):
    images, rows, cells, boxes = batch_of(rng, 32)
    loss = F.l1_loss(predict(images, rows, cells, boxes) / 1000, boxes / 1000)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    if step % 25 == 0:
        print(f"step {step} loss {loss.item():.4f} ({(time.process_time() - start) / 60:.1f} CPU-min)", flush=True)
    if step % eval_every == 0 or step == steps:
        curve.append({"step": step, "cpu_minutes": round((time.process_time() - start) / 60, 2),
                      **evaluate(eval_scenes)})
        print(curve[-1], flush=True)
        (out / "curve.json").write_text(json.dumps(curve, indent=1))
