"""Which parts of a slot does the aligned vision side produce? For object cells of held-out rendered scenes: the

    .venv/bin/python docs/probes/slot_parts.py runs/probe/r2m3/model runs/probe/r2/read/slots.safetensors
category / colour / count word read back from a token by the largest dot product with the LLM's word embeddings
(after removing the cell's own embedding), from the true slot and from the vision token."""
import random, sys, torch
from safetensors.torch import load_file
from mllm.course.base import SLOT_GRID
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer
from mllm.model.image_processing import ImageProcessor
from mllm.train.base_recipe import vision_tokens
from mllm.train.scene_slots import SceneSlots, slot_features, COLOURS, CATEGORIES, COUNT_WORDS
from mllm.world import scenes as S
torch.set_num_threads(1)
tok = load_tokenizer("mllm/assets/tiny-base")
model = MLLMModel.from_pretrained(sys.argv[1]).eval()
slots = SceneSlots(tok, 256, SLOT_GRID); slots.load_state_dict(load_file(sys.argv[2]))
proc = ImageProcessor.from_config(model.config.slice)
E = model.llm.get_input_embeddings().weight.detach()
rng = random.Random("parts")
pairs = [S.render_scene(S.sample_scene(rng, "p")) for _ in range(200)]
with torch.no_grad():
    toks = vision_tokens(model, proc, [i for i, _ in pairs]).float()
    target = slots([s for _, s in pairs], E).float()
hits = {k: [0, 0] for k in ("category", "colour", "count")}
tables = {"category": (slots.categories, 2, len(CATEGORIES)), "colour": (slots.colours, 1, len(COLOURS)),
          "count": (slots.counts, 9, len(COUNT_WORDS))}
for b, (_, scene) in enumerate(pairs):
    for f in slot_features(scene, SLOT_GRID):
        cell = f[0]
        for name, (table, col, n) in tables.items():
            words = table(torch.arange(n), E)  # (n, D)
            for j, vec in enumerate((target[b, cell], toks[b, cell])):
                guess = int(((vec - slots.cell.weight[cell].detach()) @ words.T).argmax())
                hits[name][j] += guess == f[col]
n = sum(len(slot_features(s, SLOT_GRID)) for _, s in pairs)
print({k: (round(v[0] / n, 3), round(v[1] / n, 3)) for k, v in hits.items()}, "objects", n)
