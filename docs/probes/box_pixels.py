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
    bp9  as bp6 with keys=relative (stop 42: key positions on the view's fractional coordinates);
    bp10 as bp6 with keys=relative_values (the values carry that position too)
    bp11 as bp6 with patch_boxes=1.0 (every patch of an object also regresses that object's box: a dense target, as
         phase 0's shapes and colours are)
    bp12 as bp6 with heads=8 (the resampler's attention in 8 heads of 32, not 2 of 128)
    bp15 as bp6 with centres=1.0 patch_boxes=1.0 (each patch also says whether it holds a box's centre, and each
         object patch regresses its box: can the cell's query then find the centre patch by its content?)
    bp17 as bp6 with tap=edges (each coordinate from the token of the cell its edge is in, at the box's middle)
         (stop 42, 1,000 steps: bp9 0.268, bp10 0.232, bp11 0.263, bp12 0.343, bp13 0.455, bp14 0.450, bp15 0.317,
         bp16 0.325, bp17 0.397 Acc@0.5; bp6 0.281)
    bp13 as bp3 with at=cell (the patch at the centre of the object's 6 x 6 cell: what a cell's query finds by place)
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
if "heads" in args:  # bp12: a fresh resampler whose attention has this many heads (the preset's: hidden / 128 = 2)
    from mllm.model.resampler import Resampler
    torch.manual_seed(0)
    model.resampler = Resampler(model.config.query_num, model.config.llm.hidden_size, int(args["heads"]),
                                model.config.vision.hidden_size)
if args.get("keys") in ("relative", "relative_values"):
    # stop 42: the keys' sin-cos position on the view's fractional coordinates (i / h, j / w) times a fixed
    # KEY_GRID, so that one place of the image has one key position whatever the view's patch grid (9 x 7, 16 x 4,
    # ...), where the product's table counts whole patches; relative_values: the values carry it too
    import numpy as np
    from types import MethodType

    from mllm.model.resampler import sincos_1d

    KEY_GRID = 8.0

    def relative_forward(self, x, tgt_sizes):
        B, L, _ = x.shape
        sizes = [(int(h), int(w)) for h, w in tgt_sizes.tolist()]
        pos = torch.zeros(B, L, self.embed_dim, dtype=x.dtype)  # (B, L, D), 0 at padding
        for b, (h, w) in enumerate(sizes):
            cols, rows = np.meshgrid(np.arange(w, dtype=np.float32) * KEY_GRID / w,
                                     np.arange(h, dtype=np.float32) * KEY_GRID / h)
            table = np.concatenate([sincos_1d(self.embed_dim // 2, cols), sincos_1d(self.embed_dim // 2, rows)], -1)
            pos[b, : h * w] = torch.from_numpy(table).reshape(h * w, -1).to(x.dtype)
        padding = torch.arange(L)[None, :] >= torch.tensor([h * w for h, w in sizes])[:, None]
        kv = self.ln_kv(self.kv_proj(x))  # (B, L, D)
        values = kv + pos if args["keys"] == "relative_values" else kv
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, B, 1), (kv + pos).transpose(0, 1), values.transpose(0, 1),
                        key_padding_mask=padding)[0]  # (Q, B, D)
        return self.ln_post(out.transpose(0, 1)) @ self.proj

    model.resampler.forward = MethodType(relative_forward, model.resampler)
grid = int(model.config.query_num ** 0.5)
patches, neighbours = args.get("tap") == "patches", args.get("tap") == "neighbours"
width = model.config.vision.hidden_size if patches else model.config.llm.hidden_size * (9 if neighbours else 1)
head = torch.nn.Linear(width, 4)
with torch.no_grad():  # start at the middle of the frame: the bias would take ~500 steps of lr 1e-3 to get there
    head.bias.fill_(0.5)
    head.weight.mul_(0.1)
patch_weight = float(args.get("patch_boxes", 0))  # bp11: every object patch also regresses its object's box
patch_head = torch.nn.Linear(model.config.vision.hidden_size, 4)
centre_weight = float(args.get("centres", 0))  # bp15: each patch also says whether it holds an object's box centre
centre_head = torch.nn.Linear(model.config.vision.hidden_size, 1)
frozen = args.get("frozen", "0") == "1"
vision = list(model.vpm.parameters()) + list(model.resampler.parameters())
for p in model.llm.parameters():
    p.requires_grad_(False)
for p in vision:
    p.requires_grad_(not frozen)
steps, lr = int(args.get("steps", 300)), float(args.get("lr", 1e-3))
optimizer = torch.optim.AdamW([{"params": head.parameters(), "lr": lr}]
                              + ([{"params": patch_head.parameters(), "lr": lr}] if patch_weight else [])
                              + ([{"params": centre_head.parameters(), "lr": lr}] if centre_weight else [])
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
    batch_of.scenes = [scene for _, scene in pairs]  # patch_boxes: the dense targets need the scenes
    return [image for image, _ in pairs], torch.tensor(rows), torch.tensor(cells), torch.tensor(boxes).float()


def patch_box_targets(scene, rows, cols):
    """[rows*cols, 4] the box (0-1000 grid) of the last-drawn object holding each patch's centre, and [rows*cols]
    whether one does (as phase 0's `patch_targets` assigns shapes)."""
    targets, hit = torch.zeros(rows * cols, 4), torch.zeros(rows * cols, dtype=torch.bool)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        box = torch.tensor(pixel_to_grid(obj.bbox, scene.width, scene.height, square_pad=False), dtype=torch.float)
        for i in range(rows):
            for j in range(cols):
                x, y = (j + 0.5) * scene.width / cols, (i + 0.5) * scene.height / rows
                if x0 <= x <= x1 and y0 <= y <= y1:
                    targets[i * cols + j], hit[i * cols + j] = box, True
    return targets, hit


def tower(images):
    """The vision tower's output for one view of each image: (features [B, N_max, Dv], patch mask, sizes [B, 2])."""
    from mllm.model.vision import pack_patch_strips
    views = [processor(image) for image in images]
    sizes = torch.tensor([[int(x) for x in v["tgt_sizes"][0]] for v in views], dtype=torch.int32)
    packed, mask = pack_patch_strips([v["pixel_values"][0] for v in views])
    return model.vpm(packed, mask, sizes), mask, sizes


def centre_patch(rows, sizes, cy, cx):
    """[N] the index, within its view's row-major patches, of the patch holding each fractional point (cy, cx)."""
    h, w = sizes[rows, 0], sizes[rows, 1]
    return (cy * h).long().clamp(max=h - 1) * w + (cx * w).long().clamp(max=w - 1)


def patch_features(images, rows, boxes, cells):
    """The vision tower's output at the patch holding each box's centre: [N, Dv]."""
    features, _, sizes = tower(images)  # (B, N_max, Dv)
    cy, cx = (boxes[:, 1] + boxes[:, 3]) / 2000, (boxes[:, 0] + boxes[:, 2]) / 2000
    if args.get("at") == "cell":  # bp13: the patch at the centre of the object's grid cell, not of its box
        cy, cx = (cells // grid + 0.5) / grid, (cells % grid + 0.5) / grid
    return features[rows, centre_patch(rows, sizes, cy, cx)]


def predict(images, rows, cells, boxes):
    if patches:
        return head(patch_features(images, rows, boxes, cells).float()) * 1000
    if (patch_weight or centre_weight) and model.training:  # the tower once, for the tokens and the patches
        features, mask, sizes = tower(images)  # (B, N_max, Dv)
        tokens = model.resampler(features, sizes)  # (B, Q, D)
        dense = [patch_box_targets(scene, int(h), int(w)) for scene, (h, w) in zip(batch_of.scenes, sizes.tolist())]
        real = features[mask.flatten(1)]  # (sum N_i, Dv), view by view, row-major
        targets, hit = torch.cat([t for t, _ in dense]), torch.cat([h for _, h in dense])
        predict.patch_loss = patch_weight * F.l1_loss(patch_head(real[hit].float()), targets[hit] / 1000)
        if centre_weight:  # the patch holding each box's centre, in the flattened order of `real`
            starts = torch.cumsum(torch.tensor([0] + [h * w for h, w in sizes.tolist()][:-1]), 0)
            cy, cx = (boxes[:, 1] + boxes[:, 3]) / 2000, (boxes[:, 0] + boxes[:, 2]) / 2000
            marks = torch.zeros(len(real))
            marks[starts[rows] + centre_patch(rows, sizes, cy, cx)] = 1.0
            predict.patch_loss = predict.patch_loss + centre_weight * F.binary_cross_entropy_with_logits(
                centre_head(real.float())[:, 0], marks)
    else:
        tokens = vision_tokens(model, processor, images)  # (B, Q, D)
    if neighbours:  # the cell's 3 x 3 neighbourhood of tokens side by side, zeros beyond the grid's edge
        padded = F.pad(tokens.reshape(len(images), grid, grid, -1), (0, 0, 1, 1, 1, 1))  # (B, G+2, G+2, D)
        r, c = cells // grid + 1, cells % grid + 1
        around = [padded[rows, r + dr, c + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)]  # 9 x (N, D)
        return head(torch.cat(around, -1).float()) * 1000
    if args.get("tap") == "edges":  # bp17: coordinate k from the token of the cell its edge is in, at the box's middle
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        points = [(boxes[:, 0], cy), (cx, boxes[:, 1]), (boxes[:, 2], cy), (cx, boxes[:, 3])]  # x0, y0, x1, y1
        edge_cells = [(y * grid / 1000).long().clamp(max=grid - 1) * grid + (x * grid / 1000).long().clamp(max=grid - 1)
                      for x, y in points]
        return torch.stack([head(tokens[rows, c].float())[:, k] for k, c in enumerate(edge_cells)], 1) * 1000
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
    if patch_weight or centre_weight:
        loss = loss + predict.patch_loss
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
