"""How well a base stage's image tokens hold what the slots hold: each object's colour, category and count word
read back from its cell's token (`SceneSlots.readout_loss`'s read, argmax instead of cross-entropy), on freshly
rendered scenes of a seed no stage draws.

    .venv/bin/python docs/probes/slot_readout.py runs/course16/base/align runs/course17/base/align [scenes=600]

Count is read per object: the word of its category's count in the whole image ("two" for each circle of a
two-circle scene), a fact the cell's own pixels do not hold. Its prior (every object "one") is printed beside it.
"""
import random
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from mllm.course.base import SLOT_GRID
from mllm.model.image_processing import ImageProcessor
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer
from mllm.train.base_recipe import vision_tokens
from mllm.train.scene_slots import SceneSlots
from mllm.world import scenes as S

if __name__ == "__main__":
    stages = [Path(a) for a in sys.argv[1:] if "=" not in a]
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    n_scenes = int(args.get("scenes", 600))
    rng = random.Random("slot_readout/7")
    rendered = [S.render_scene(S.sample_scene(rng, f"probe{i}")) for i in range(n_scenes)]
    images, scenes = [image for image, _ in rendered], [scene for _, scene in rendered]
    counts = [min(6, Counter(o.category for o in s.objects)[o.category]) for s in scenes for o in s.objects]
    print(f"{n_scenes} scenes, {len(counts)} objects; count prior (every object 'one'): "
          f"{sum(c == 1 for c in counts) / len(counts):.3f}; objects whose category repeats: "
          f"{sum(c > 1 for c in counts)}")
    for stage in stages:
        model = MLLMModel.from_pretrained(stage / "model").eval()
        tokenizer = load_tokenizer(stage / "model")
        slots = SceneSlots(tokenizer, model.config.llm.hidden_size, SLOT_GRID, box_code="number")
        slots.load_state_dict(load_file(str(stage / "slots.safetensors")))
        processor = ImageProcessor.from_config(model.config.slice)
        embedding = model.llm.get_input_embeddings().weight
        hits = {name: [] for name in ("colour", "category", "count")}
        repeated = []
        with torch.no_grad():
            for start in range(0, n_scenes, 50):
                batch = scenes[start:start + 50]
                tokens = vision_tokens(model, processor, images[start:start + 50]).float()
                f, content = slots._contents(batch, tokens)
                tables = (("colour", slots.colours), ("category", slots.categories), ("count", slots.counts))
                for (name, table), column in zip(tables, (1, 2, 9)):
                    words = table(torch.arange(len(table.ids)), embedding).float()
                    right = ((content @ words.T).argmax(-1) == f[:, column]).tolist()
                    hits[name] += right
                    if name == "count":  # column 9 holds count - 1: above 0 where the category repeats
                        repeated += [h for h, c in zip(right, f[:, column].tolist()) if c > 0]
        line = ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in hits.items())
        print(f"{stage}: {line}; count where the category repeats {sum(repeated) / max(1, len(repeated)):.3f}",
              flush=True)
