"""Can the vision tower's global attention compute a count? Phase 0's patch heads plus one more: each object patch
classifies how many objects of its own category the image holds (1, 2, 3, 4+; 0 = background). The tower starts
from a finished phase 0 (or fresh with fresh=1) and trains with all three heads; accuracy on the count of held-out
scenes' object patches, split by the true count, against the prior (every object patch says 1).

    OMP_NUM_THREADS=1 nohup .venv/bin/python docs/probes/count_tower.py from=runs/course16 out=runs/ct1 \
        steps=600 [lr=1e-3 batch=64 count_weight=1.0 fresh=0] > runs/ct1.log 2>&1 &
"""
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from mllm.course.base import SHAPES, patch_targets
from mllm.model.image_processing import ImageProcessor
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.vision import pack_patch_strips

MAX_COUNT = 4


def count_targets(scene: dict, shape: torch.Tensor) -> torch.Tensor:
    """Per patch: objects of the patch's category in the scene (capped at MAX_COUNT), 0 for background."""
    counts = Counter(o["category"] for o in scene["objects"])
    table = torch.tensor([0] + [min(counts.get(s, 0), MAX_COUNT) for s in SHAPES])
    return table[shape]


def with_counts(world: Path, processor, split: str, limit: int) -> list[dict]:
    scenes = [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines() if line.strip()]
    scenes = [s for s in scenes if s["split"] == split][:limit]
    out = []
    for scene in scenes:
        views = processor(world / scene["image"])
        rows, cols = (int(v) for v in views["tgt_sizes"][0])
        shape, colour = patch_targets(scene, rows, cols)
        out.append({"strip": views["pixel_values"][0], "size": (rows, cols), "shape": shape, "colour": colour,
                    "count": count_targets(scene, shape)})
    return out


def forward(model, heads, batch):
    packed, patch_mask = pack_patch_strips([e["strip"] for e in batch])
    sizes = torch.tensor([e["size"] for e in batch], dtype=torch.int32)
    patches = model.vpm(packed, patch_mask, sizes)
    real = patches[patch_mask.flatten(1)]
    return [head(real) for head in heads]


def accuracy(model, heads, examples) -> dict:
    model.vpm.eval()
    hits, totals = Counter(), Counter()
    with torch.no_grad():
        for start in range(0, len(examples), 64):
            batch = examples[start:start + 64]
            _, _, count_logits = forward(model, heads, batch)
            truth = torch.cat([e["count"] for e in batch])
            guess = count_logits.argmax(-1)
            for t, g in zip(truth.tolist(), guess.tolist()):
                if t:
                    totals[t] += 1
                    hits[t] += t == g
    model.vpm.train()
    result = {f"count{t}": round(hits[t] / totals[t], 3) for t in sorted(totals)}
    result["all"] = round(sum(hits.values()) / sum(totals.values()), 3)
    result["prior"] = round(totals[1] / sum(totals.values()), 3)
    return result


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    source, out = Path(args["from"]), Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    steps, lr, batch_size = int(args.get("steps", 600)), float(args.get("lr", 1e-3)), int(args.get("batch", 64))
    weight = float(args.get("count_weight", 1.0))
    model = MLLMModel.from_pretrained(source / "base" / ("init" if args.get("fresh") == "1" else "phase0"))
    processor = ImageProcessor.from_config(model.config.slice)
    world = source / "world"
    train = with_counts(world, processor, "train", int(args.get("limit", 4000)))
    test = with_counts(world, processor, "test", 300)
    width = model.config.vision.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(width, len(SHAPES) + 1), torch.nn.Linear(width, 9),
                                 torch.nn.Linear(width, MAX_COUNT + 1)])
    params = list(model.vpm.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(0)
    torch.manual_seed(0)
    print("before (untrained count head)", accuracy(model, heads, test), flush=True)
    for step in range(steps):
        batch = rng.sample(train, batch_size)
        shape_logits, colour_logits, count_logits = forward(model, heads, batch)
        loss = (F.cross_entropy(shape_logits, torch.cat([e["shape"] for e in batch]))
                + F.cross_entropy(colour_logits, torch.cat([e["colour"] for e in batch]))
                + weight * F.cross_entropy(count_logits, torch.cat([e["count"] for e in batch])))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print({"step": step + 1, "loss": round(loss.item(), 4), "test": accuracy(model, heads, test)}, flush=True)
