"""How sure a model is of each shape it names: its greedy descriptions scored token by token (teacher-forced), the
probability of every shape name at each shape word it wrote. Hedge pairs (`mllm.course.self_pairs`, `hedge_below`)
can aim the hedge word at the shapes the model wrote below a probability.

Measured on course18's base (300 greedy descriptions of fresh scenes, 1,006 object sentences, 54 shapes misnamed):
the 11.5 % of shape words below p 0.7 hold half of the misnamed ones, the 16.8 % below 0.8 two thirds
(`docs/probes/shape_confidence.py`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from mllm.world import scenes as S


def shape_word_probs(model_dir: str | Path, answers: list[dict], image_root: str | Path, batch_size: int = 16,
                     progress: bool = False) -> list[list[dict[str, float]]]:
    """For each `mllm answer` row (question, answer, metainfos.image_path relative to `image_root`) and each shape
    word of its answer (any name of `scenes.NAME_TO_CATEGORY` that is one token), in text order: the model's
    probability of every such name at that word's place, given the image, the question and the answer's words
    before it (the word written among them)."""
    from mllm.data.collate import SupervisedCollator
    from mllm.data.preference_dataset import PreferenceDataset
    from mllm.model.modeling_mllm import MLLMModel
    from mllm.model.tokenization import load_tokenizer
    from mllm.train.losses import IGNORE_INDEX

    model = MLLMModel.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    pieces = {name: tokenizer.encode(" " + name, add_special_tokens=False) for name in S.NAME_TO_CATEGORY}
    # a name of several tokens (a small tokenizer's) would be found by a first piece other words share: such a name
    # is not scored, and `self_pairs.unsure_shapes` then finds the description's words and probabilities unequal
    names = {ids[0]: name for name, ids in pieces.items() if len(ids) == 1}
    ids = torch.tensor(list(names))
    records = [{"idx": i, "question": a["question"], "chosen": a["answer"].strip(), "rejected": a["answer"].strip(),
                "image_path": a["metainfos"]["image_path"]} for i, a in enumerate(answers)]
    with tempfile.TemporaryDirectory() as folder:  # the pair dataset reads a file; each record's two sides alike
        data = Path(folder) / "descriptions.json"
        data.write_text(json.dumps(records))
        dataset = PreferenceDataset.from_config(data, tokenizer, model.config, image_root, None, 512)
        collate = SupervisedCollator(pad_id=tokenizer.pad_token_id or 0)
        probs: list[list[dict[str, float]]] = []
        with torch.inference_mode():
            for start in tqdm(range(0, len(dataset), batch_size), desc="shape confidence", disable=not progress):
                samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                batch = collate([{"input_ids": f["chosen_input_ids"], "labels": f["chosen_labels"],
                                  "image_bound": f["chosen_image_bound"], "pixel_values": f["pixel_values"],
                                  "tgt_sizes": f["tgt_sizes"]} for f in samples])
                labels = batch.pop("labels")
                shapes = model(**batch).logits.float().softmax(-1)[..., ids]  # (B, L, shape names)
                for row, row_labels in zip(shapes, labels):
                    places = [t for t, token in enumerate(row_labels.tolist())
                              if token != IGNORE_INDEX and token in names]
                    probs.append([dict(zip(names.values(), row[t].tolist())) for t in places])
    return probs
