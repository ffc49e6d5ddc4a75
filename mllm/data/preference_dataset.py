"""Preference pairs (`preference_train.json`) -> chosen / rejected training samples, and their batch collator.

A data file is a JSON list of records (facts sheet §8.3)

    {"idx": 0, "question": "Describe the image.", "chosen": "...", "rejected": "...",
     "image_path": "images/train/x.png"   (relative to `image_folder`)  |  "image": "<base64 bytes>",
     "metainfos": {...} (optional), "rejected_open": true (optional)}

as JSON or JSON lines, or the RLAIF-V parquet layout (a datasets folder or .parquet file(s), image bytes written
to `image_cache`, see `mllm.data.formats.read_preference_pairs`).

Each record gives two conversations sharing the prompt and the image: user "<image>\\n{question}", then the
chosen (or the rejected) answer as the assistant reply, each turned into input_ids / pre-shifted labels /
image_bound by `conversation_to_ids` (the SFT conventions). `idx` identifies a pair (the reference-log-prob
cache is keyed by it; a record without `idx` gets its position); duplicates are refused.

A pair with `"rejected_open": true` has a rejected answer that stops inside a sentence, right after its error
(`mllm.course.self_pairs.cut_at_error`): its end token is not scored, so that the pair's log-ratio holds the error
alone and not a stop nobody would write there.

With `reference` (idx -> cached entry, see `mllm.train.logp`), each sample also carries the reference
log-probs of both answers, summed and token-averaged.

`PreferenceCollator` builds ONE concatenated batch (facts sheet §8.3): rows [0, B) are the chosen answers and
rows [B, 2B) the rejected ones, right-padded together (`SupervisedCollator`); each row keeps its own image views
(the pair's views, so they appear twice) and bounds; tgt_sizes = the chosen rows' then the rejected rows'.
`ref_chosen_logps`, `ref_rejected_logps` and the `_avg_` variants are float32 [B] tensors; `idx` is a list.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mllm.data.collate import SupervisedCollator
from mllm.data.conversation import IGNORE_INDEX, conversation_to_ids, place_images
from mllm.data.formats import read_preference_pairs
from mllm.model.image_processing import ImageProcessor
from mllm.model.tokenization import special_token_ids

SIDES = ("chosen", "rejected")
REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_avg_logps", "ref_rejected_avg_logps")
BASE64_MIN_CHARS = 1000  # an `image` value longer than this is base64 data, else a path (facts sheet §9.1)


def pair_key(idx) -> str:
    """The cache key of a pair: its idx as a string (JSON object keys and ints from JSON both map to it)."""
    return str(idx)


class PreferenceDataset(Dataset):
    def __init__(self, data_path: str | os.PathLike, tokenizer, image_processor: ImageProcessor, query_num: int,
                 image_folder: str | os.PathLike = ".", model_max_length: int | None = 2048,
                 reference: dict[str, dict] | None = None, image_cache: str | os.PathLike | None = None,
                 question_first: bool = False):
        self.data_path = Path(data_path)
        self.question_first = question_first  # the image after the question (`place_images`)
        self.image_cache = image_cache
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.query_num = query_num
        self.image_folder = Path(image_folder)
        self.model_max_length = model_max_length
        self.token_ids = special_token_ids(tokenizer)
        self.records = self._read()
        self.keys = [pair_key(r.get("idx", i)) for i, r in enumerate(self.records)]
        repeated = sorted(k for k, n in Counter(self.keys).items() if n > 1)
        if repeated:
            raise ValueError(f"{self.data_path}: idx values repeat ({repeated[:10]}); each pair needs its own idx")
        self.reference = reference
        if reference is not None:
            missing = [k for k in self.keys if k not in reference]
            if missing:
                raise KeyError(f"the reference log-probs lack {len(missing)} of the {len(self.keys)} pairs of "
                               f"{self.data_path} (idx {missing[:10]}); recompute them with `mllm logp`")

    @classmethod
    def from_config(cls, data_path, tokenizer, config, image_folder=".", max_slice_nums: int | None = None,
                    model_max_length: int | None = 2048, reference: dict | None = None,
                    image_cache=None) -> "PreferenceDataset":
        """Slicing, query count and image placement from an MLLMConfig; `max_slice_nums` overrides the config's."""
        processor = ImageProcessor.from_config(config.slice)
        if max_slice_nums is not None:
            processor.max_slice_nums = max_slice_nums
        return cls(data_path, tokenizer, processor, config.query_num, image_folder, model_max_length, reference,
                   image_cache, config.question_first)

    def _read(self) -> list[dict]:
        records, self.format_name = read_preference_pairs(self.data_path, self.image_cache)
        for i, r in enumerate(records):
            bad = [k for k in ("question", "chosen", "rejected") if not isinstance(r.get(k), str)]
            if bad:
                raise ValueError(f"{self.data_path}: record {i} needs string fields {bad}")
            if not isinstance(r.get("image_path"), str) and not isinstance(r.get("image"), str):
                raise ValueError(f"{self.data_path}: record {i} (idx {r.get('idx', i)!r}) has neither 'image_path' "
                                 "nor 'image'")
            path = self._image_path(r)
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"{self.data_path}: record {i} (idx {r.get('idx', i)!r}): image {str(path)!r} "
                                        f"not found (image_folder {str(self.image_folder)!r})")
        return records

    def _image_path(self, record: dict) -> Path | None:
        """The record's image file, or None when the image is base64 data."""
        value = record.get("image_path")
        if not isinstance(value, str):
            value = record["image"]
            if len(value) > BASE64_MIN_CHARS:
                return None
        return self.image_folder / value

    def __len__(self) -> int:
        return len(self.records)

    def conversation(self, record: dict, side: str) -> list[dict]:
        # place_images adds the image where the question has no `<image>` key
        return [{"role": "user", "content": record["question"]}, {"role": "assistant", "content": record[side]}]

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        path = self._image_path(record)
        try:
            image = self.image_processor(path if path is not None else record["image"])
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.data_path}: pair idx {self.keys[index]}: image: {err}") from err
        sample = {"idx": record.get("idx", index), "pixel_values": image["pixel_values"],
                  "tgt_sizes": image["tgt_sizes"]}
        for side in SIDES:
            conversation, _ = place_images(self.conversation(record, side), {"<image>": image["grid"]}, self.query_num,
                                           self.question_first)
            try:
                ids = conversation_to_ids(conversation, self.tokenizer, self.model_max_length, self.query_num,
                                          self.token_ids)
            except ValueError as err:  # NoTargetError, TruncationError, template problems
                raise ValueError(f"{self.data_path}: pair idx {self.keys[index]} ({side}): {err}") from err
            labels = ids["labels"]
            if side == "rejected" and record.get("rejected_open") is True:
                labels = _without_end(labels)
            sample[f"{side}_input_ids"] = ids["input_ids"]
            sample[f"{side}_labels"] = labels
            sample[f"{side}_image_bound"] = ids["image_bound"]
        if self.reference is not None:
            entry = self.reference[self.keys[index]]
            for side in SIDES:
                sample[f"ref_{side}_logps"] = float(entry[f"{side}_logp"])
                sample[f"ref_{side}_avg_logps"] = float(entry[f"{side}_avg_logp"])
        return sample


def _without_end(labels):
    """Labels (pre-shifted) with the last scored target, the assistant turn's end token, set to ignore."""
    labels = torch.as_tensor(labels).clone()
    scored = (labels != IGNORE_INDEX).nonzero()
    if len(scored):
        labels[scored[-1, 0]] = IGNORE_INDEX
    return labels


@dataclass
class PreferenceCollator:
    pad_id: int = 0

    def __call__(self, features: list[dict]) -> dict:
        rows = [{"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"],
                 "image_bound": f[f"{side}_image_bound"], "pixel_values": f["pixel_values"],
                 "tgt_sizes": f["tgt_sizes"]} for side in SIDES for f in features]  # chosen rows, then rejected
        batch = SupervisedCollator(pad_id=self.pad_id)(rows)  # (2B, L) each
        for key in REFERENCE_KEYS:
            if all(key in f for f in features):
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)  # (B,)
        batch["idx"] = [f["idx"] for f in features]
        return batch
