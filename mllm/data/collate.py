"""Collator: samples of `SupervisedDataset` (or any {input_ids, labels, pixel_values, tgt_sizes, image_bound}
dicts) -> one training batch (facts sheet §8.2).

- Right padding: input_ids with `pad_id` (0, the reference's pad), labels with -100, position_ids with 0.
- attention_mask comes from the lengths (1 on the first len_i positions), NOT from `input_ids != pad_id`:
  id 0 is `<|endoftext|>`, a token that may legitimately occur inside a sequence.
- position_ids = arange(len_i) per sample; right padding leaves image_bound unchanged.
- pixel_values, tgt_sizes and image_bound stay per-sample lists (samples have different numbers of views).
- `None` samples (a dataset's way of saying "skip me") are dropped; an all-None batch raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm.data.conversation import IGNORE_INDEX


@dataclass
class SupervisedCollator:
    pad_id: int = 0
    max_length: int | None = None  # optional hard cap; the dataset already truncates image-safely

    def __call__(self, features: list[dict | None]) -> dict:
        features = [f for f in features if f is not None]
        if not features:
            raise ValueError("every sample of this batch was skipped")
        seqs = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [torch.as_tensor(f["labels"], dtype=torch.long) for f in features]
        if self.max_length is not None:
            for f, s in zip(features, seqs):
                bound = torch.as_tensor(f.get("image_bound", []), dtype=torch.long).reshape(-1, 2)
                if len(s) > self.max_length and len(bound) and int(bound[:, 1].max()) >= self.max_length:
                    raise ValueError(f"a sample of {len(s)} tokens cannot be cut to {self.max_length} without "
                                     "cutting an image")
            seqs = [s[: self.max_length] for s in seqs]
            labels = [l[: self.max_length] for l in labels]
        lengths = torch.tensor([len(s) for s in seqs])
        longest = int(lengths.max())
        batch = len(seqs)
        input_ids = torch.full((batch, longest), self.pad_id, dtype=torch.long)  # (B, L)
        label_ids = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)  # (B, L)
        position_ids = torch.zeros((batch, longest), dtype=torch.long)  # (B, L)
        for b, (s, l) in enumerate(zip(seqs, labels)):
            input_ids[b, : len(s)] = s
            label_ids[b, : len(l)] = l
            position_ids[b, : len(s)] = torch.arange(len(s))
        attention_mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()  # (B, L)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": label_ids,
            "pixel_values": [list(f.get("pixel_values", [])) for f in features],
            "tgt_sizes": [torch.as_tensor(f.get("tgt_sizes", torch.zeros(0, 2)), dtype=torch.int32).reshape(-1, 2)
                          for f in features],
            "image_bound": [torch.as_tensor(f.get("image_bound", torch.zeros(0, 2)), dtype=torch.long).reshape(-1, 2)
                            for f in features],
        }
