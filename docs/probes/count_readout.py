"""Can the resampler carry a count at all? Train only the resampler of an `align`-stage model (the vision tower
frozen, its features computed once per batch) on the count word's read-back alone (`SceneSlots.readout_loss`'s
cross-entropy, count column only), on fresh rendered scenes, and read the count back on 400 held-out scenes
(`slot_readout.py`'s measure) every `every` steps.

    OMP_NUM_THREADS=1 nohup .venv/bin/python docs/probes/count_readout.py runs/course17/base/align \
        steps=600 lr=1e-3 > runs/count_readout_q1.log 2>&1 &

With query layers (`resampler_query_layers` > 0) a token can gather the others' categories; with none it sees only
its own keys, so its count read-back is bounded by the prior (0.51 here) unless the tower's features carry it.
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
from mllm.train.scene_slots import READOUT_SCALE, SceneSlots
from mllm.world import scenes as S


def count_logits(slots: SceneSlots, scenes, tokens, embedding):
    f, content = slots._contents(scenes, tokens)  # (N, 10), (N, D)
    words = slots.counts(torch.arange(len(slots.counts.ids)), embedding).float()  # (6, D)
    return READOUT_SCALE * (content @ words.T) / words.pow(2).sum(-1).mean(), f[:, 9]


if __name__ == "__main__":
    stage = Path(sys.argv[1])
    args = dict(a.split("=", 1) for a in sys.argv[2:])
    steps, lr, every = int(args.get("steps", 600)), float(args.get("lr", 1e-3)), int(args.get("every", 100))
    model = MLLMModel.from_pretrained(stage / "model")
    tokenizer = load_tokenizer(stage / "model")
    slots = SceneSlots(tokenizer, model.config.llm.hidden_size, SLOT_GRID, box_code="number")
    slots.load_state_dict(load_file(str(stage / "slots.safetensors")))
    processor = ImageProcessor.from_config(model.config.slice)
    embedding = model.llm.get_input_embeddings().weight.detach().float()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.resampler.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.resampler.parameters(), lr=lr, weight_decay=0.01)
    held_rng = random.Random("slot_readout/7")
    held = [S.render_scene(S.sample_scene(held_rng, f"probe{i}")) for i in range(400)]

    def evaluate(step: int) -> None:
        model.eval()
        right, repeats = [], []
        with torch.no_grad():
            for start in range(0, len(held), 50):
                batch = held[start:start + 50]
                scenes = [scene for _, scene in batch]
                tokens = vision_tokens(model, processor, [image for image, _ in batch]).float()
                logits, truth = count_logits(slots, scenes, tokens, embedding)
                hits = (logits.argmax(-1) == truth).tolist()
                right += hits
                repeats += [h for h, t in zip(hits, truth.tolist()) if t > 0]
        print(f"step {step}: count read back {sum(right) / len(right):.3f}, where the category repeats "
              f"{sum(repeats) / len(repeats):.3f}", flush=True)
        model.train()

    counts = Counter(min(6, Counter(o.category for o in s.objects)[o.category]) for _, s in held for o in s.objects)
    prior = counts[1] / sum(counts.values())
    print(f"{stage}: query layers {model.config.resampler_query_layers}, count prior {prior:.3f}")
    evaluate(0)
    rng = random.Random("count_readout/0")
    model.train()
    for step in range(1, steps + 1):
        batch = [S.render_scene(S.sample_scene(rng, "lesson")) for _ in range(32)]
        tokens = vision_tokens(model, processor, [image for image, _ in batch]).float()
        logits, truth = count_logits(slots, [scene for _, scene in batch], tokens, embedding)
        loss = F.cross_entropy(logits, truth)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
        if step % every == 0:
            evaluate(step)
