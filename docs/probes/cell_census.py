"""Is the count in a stage's image tokens, cell by cell? A linear probe over each cell's token (frozen model)
classifies the cell as empty or as holding the centre of an object of one category; the probe's census of a
scene (cells per category) is then compared with the truth, split by how many objects of the category the scene
holds. If the census counts twice-present categories right where the LLM answers as if they were there once, the
LLM's counting is what fails; if the census fails too, the tokens are.

    OMP_NUM_THREADS=1 .venv/bin/python docs/probes/cell_census.py runs/course21/base/tune [train=2000 test=600]

With the stage's slot tables beside it (slots.safetensors), the census read the way `SceneSlots.census_loss` reads
it (no probe trained) is reported first. Also prints the probe's errors by kind: an empty cell taken for an object
(a ghost, most often beside an object of that category), an object cell called empty (missed), or called another
category.
"""
import random
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mllm.course.base import SLOT_GRID
from mllm.model.image_processing import ImageProcessor
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer
from mllm.train.base_recipe import vision_tokens
from mllm.train.scene_slots import CENSUS_SCALE, SceneSlots, slot_features
from mllm.world import scenes as S

N_CATEGORIES = len(S.CATEGORIES)


def cell_labels(scene: S.Scene) -> torch.Tensor:
    """[Q]: 0 for a cell holding no object's centre, 1 + category for one holding some (the last one drawn)."""
    labels = torch.zeros(SLOT_GRID * SLOT_GRID, dtype=torch.long)
    for features in slot_features(scene, SLOT_GRID):
        labels[features[0]] = 1 + features[2]
    return labels


def tokens_of(model, processor, seed: str, n: int) -> tuple[list[S.Scene], torch.Tensor]:
    rng = random.Random(seed)
    rendered = [S.render_scene(S.sample_scene(rng, f"census{i}")) for i in range(n)]
    scenes = [scene for _, scene in rendered]
    out = []
    with torch.no_grad():
        for start in range(0, n, 50):
            out.append(vision_tokens(model, processor, [image for image, _ in rendered[start:start + 50]]).float())
    return scenes, torch.cat(out)  # (n, Q, D)


def census_report(scenes: list[S.Scene], predicted: torch.Tensor) -> None:
    """predicted [n, Q] cell classes -> per-(scene, present category) count exactness by true multiplicity."""
    right, total = Counter(), Counter()
    for scene, cells in zip(scenes, predicted.tolist()):
        truth = Counter(features[2] for features in slot_features(scene, SLOT_GRID))
        seen = Counter(c - 1 for c in cells if c > 0)
        for category, k in truth.items():
            key = min(k, 3)
            total[key] += 1
            right[key] += seen[category] == k
    print("census exact, by the category's true count: " + ", ".join(
        f"{'3+' if k == 3 else k}: {right[k]}/{total[k]} = {right[k] / total[k]:.3f}" for k in sorted(total)))


if __name__ == "__main__":
    stage = Path(sys.argv[1])
    args = dict(a.split("=", 1) for a in sys.argv[2:])
    torch.set_num_threads(int(args.get("threads", 1)))
    model = MLLMModel.from_pretrained(stage / "model").eval()
    processor = ImageProcessor.from_config(model.config.slice)
    train_scenes, train_x = tokens_of(model, processor, "cell_census/train", int(args.get("train", 2000)))
    test_scenes, test_x = tokens_of(model, processor, "cell_census/test", int(args.get("test", 600)))
    if (stage / "slots.safetensors").exists():
        slots = SceneSlots(load_tokenizer(stage / "model"), model.config.llm.hidden_size, SLOT_GRID, box_code="number")
        slots.load_state_dict(load_file(str(stage / "slots.safetensors")))
        with torch.no_grad():
            words = slots.categories(torch.arange(len(slots.categories.ids)), model.llm.get_input_embeddings().weight)
            scores = CENSUS_SCALE * ((test_x - slots.cell.weight[None]) @ words.T) / words.pow(2).sum(-1).mean()
            read = torch.cat([torch.full_like(scores[..., :1], CENSUS_SCALE / 2), scores], -1).argmax(-1)
        y = torch.stack([cell_labels(s) for s in test_scenes])
        print(f"census read by the slots' words: cells {(read == y).float().mean():.4f}, empty cells empty "
              f"{(read[y == 0] == 0).float().mean():.4f}, object cells right "
              f"{(read[y > 0] == y[y > 0]).float().mean():.4f}")
        census_report(test_scenes, read)
    train_y = torch.stack([cell_labels(s) for s in train_scenes])
    test_y = torch.stack([cell_labels(s) for s in test_scenes])
    mean, std = train_x.mean((0, 1)), train_x.std((0, 1)) + 1e-6
    probe = torch.nn.Linear(train_x.shape[-1], 1 + N_CATEGORIES)
    optimizer = torch.optim.Adam(probe.parameters(), lr=float(args.get("lr", 3e-3)), weight_decay=1e-4)
    flat_x, flat_y = ((train_x - mean) / std).reshape(-1, train_x.shape[-1]), train_y.reshape(-1)
    for step in range(int(args.get("steps", 600))):
        loss = F.cross_entropy(probe(flat_x), flat_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 200 == 0:
            print(f"probe step {step + 1}: loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        predicted = probe((test_x - mean) / std).argmax(-1)  # (n, Q)
        train_pred = probe((train_x - mean) / std).argmax(-1)
    for name, scenes, pred, y in (("train", train_scenes, train_pred, train_y), ("test", test_scenes, predicted,
                                                                               test_y)):
        empty, full = y == 0, y > 0
        print(f"{name}: cells {(pred == y).float().mean():.4f}; empty cells called empty "
              f"{(pred[empty] == 0).float().mean():.4f} ({int(empty.sum())}); object cells right "
              f"{(pred[full] == y[full]).float().mean():.4f} ({int(full.sum())}), called empty "
              f"{(pred[full] == 0).float().mean():.4f}")
        census_report(scenes, pred)
    ghosts = (test_y == 0) & (predicted > 0)
    beside_same = 0
    for b, q in ghosts.nonzero().tolist():
        r, c = divmod(q, SLOT_GRID)
        near = [test_y[b, rr * SLOT_GRID + cc].item() for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                if 0 <= rr < SLOT_GRID and 0 <= cc < SLOT_GRID and (rr, cc) != (r, c)]
        beside_same += predicted[b, q].item() in near
    print(f"test ghosts (empty cells called an object): {int(ghosts.sum())}, of them beside an object of the category "
          f"called: {beside_same}; scenes {len(test_scenes)}")
