"""`SupervisedDataset`: the exercise's `data/train.json` format -> training samples (facts sheet §9.5).

A data file is read by `mllm.data.formats.read_conversations` (JSON, JSON lines or Hugging Face datasets data;
the minicpmv, llava or sharegpt record layouts, see there) into the project's records

    {"id": ..., "image": "relative/path.jpg" | {"<image_00>": path, "<image_01>": path} (optional),
     "conversations": [{"role": "user", "content": "<image>\\nIs there ...?"}, {"role": "assistant", ...}]}

Image paths are relative to `image_folder` (absolute paths are used as they are). A sample is
{input_ids long [L], labels long [L] (pre-shifted, see `mllm.data.conversation`), pixel_values (list of
[3, 14, N*14] strips, images in textual order, each image's source view then its slices), tgt_sizes int32
[V, 2], image_bound long [V, 2]}.

Every record is checked once when the dataset is built (image headers and tokenization only, no decoding):
- a missing or unreadable image raises `BadImageError` naming the record id, the path and the JSON file;
  with `skip_bad_images=True` it is counted and reported instead, and the record is left out;
- a record that leaves no target token (`NoTargetError`) or whose images do not fit in `model_max_length`
  (`TruncationError`) is always left out, counted and reported with its id: never a crash mid-epoch.
`report` holds the ids; `summary()` is the line `train()` prints. An image that passes the header check but
fails to decode later raises the same error in strict mode; in skip mode it is counted and the next usable
record is returned instead, so batch sizes stay exact.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from mllm.data.conversation import (NoTargetError, TruncationError, conversation_to_ids, normalize_conversation,
                                    place_images)
from mllm.data.formats import describe, read_conversations
from mllm.model.image_processing import MAX_IMAGE_PIXELS, ImageProcessor, get_sliced_grid
from mllm.model.tokenization import special_token_ids

logger = logging.getLogger(__name__)
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


class BadImageError(ValueError):
    """A record's image is missing or cannot be read."""


def image_entries(record: dict) -> dict[str, str]:
    """The record's images as {key: path}: `"image": path` becomes {"<image>": path}; no image gives {}."""
    image = record.get("image")
    if image is None:
        return {}
    if isinstance(image, str):
        return {"<image>": image}
    if isinstance(image, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in image.items()):
        return dict(image)
    raise ValueError(f"'image' must be a path or a {{'<image_NN>': path}} dict, got {image!r:.200}")


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation, from the file header only (no pixel decoding)."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION, 1) in _SWAPS_SIDES:
            width, height = height, width
    return width, height


class SupervisedDataset(Dataset):
    def __init__(self, data_path: str | os.PathLike, tokenizer, image_processor: ImageProcessor, query_num: int,
                 image_folder: str | os.PathLike = ".", model_max_length: int | None = 2048,
                 skip_bad_images: bool = False, data_format: str = "auto",
                 image_cache: str | os.PathLike | None = None, question_first: bool = False):
        self.data_path = Path(data_path)
        self.question_first = question_first  # the image after the first question (`place_images`)
        self.data_format = data_format
        self.image_cache = image_cache  # where image bytes of datasets data are written (formats.image_file)
        self.format_name = None
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.query_num = query_num
        self.image_folder = Path(image_folder)
        self.model_max_length = model_max_length
        self.skip_bad_images = skip_bad_images
        self.token_ids = special_token_ids(tokenizer)
        self.report: dict[str, list] = {"bad_images": [], "no_target": [], "too_long": [], "truncated": []}
        self.failed_at_load = 0
        records = self._read()
        self.records = [r for r in records if self._usable(r)]
        self.num_read = len(records)
        logger.debug(self.summary())  # train() prints it; `report` holds the ids

    @classmethod
    def from_config(cls, data_path, tokenizer, config, image_folder=".", max_slice_nums: int | None = None,
                    model_max_length: int | None = 2048, skip_bad_images: bool = False, data_format: str = "auto",
                    image_cache=None) -> "SupervisedDataset":
        """Slicing, query count and image placement from an MLLMConfig; `max_slice_nums` overrides the config's."""
        processor = ImageProcessor.from_config(config.slice)
        if max_slice_nums is not None:
            processor.max_slice_nums = max_slice_nums
        return cls(data_path, tokenizer, processor, config.query_num, image_folder, model_max_length,
                   skip_bad_images, data_format, image_cache, config.question_first)

    # ---- reading and checking ------------------------------------------------------------------------------
    def _read(self) -> list[dict]:
        records, self.format_name = read_conversations(self.data_path, self.data_format, self.image_cache)
        for i, r in enumerate(records):
            try:
                r["conversations"] = normalize_conversation(r["conversations"])
            except ValueError as err:
                raise ValueError(f"{self.data_path}: record {i} (id {r.get('id', '?')!r}): {err}") from None
        return records

    def _where(self, record: dict) -> str:
        return f"{self.data_path}: record id {record.get('id', '?')!r}"

    def _path(self, relative: str) -> Path:
        return self.image_folder / relative

    def _bad_image(self, record: dict, path: Path, reason: str) -> None:
        message = f"{self._where(record)}: image {str(path)!r}: {reason}"
        if not self.skip_bad_images:
            raise BadImageError(message)
        logger.warning("skipping: %s", message)
        self.report["bad_images"].append((record.get("id"), str(path)))

    def _usable(self, record: dict) -> bool:
        """Check one record with image headers and tokenization; False (and reported) if it must be skipped."""
        try:
            entries = image_entries(record)
        except ValueError as err:
            raise ValueError(f"{self._where(record)}: {err}") from None
        grids = {}
        for key, relative in entries.items():
            path = self._path(relative)
            try:
                size = oriented_size(path)
            except FileNotFoundError:
                self._bad_image(record, path, "file not found")
                return False
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # broken header
                self._bad_image(record, path, f"cannot be read ({err})")
                return False
            if size[0] * size[1] > MAX_IMAGE_PIXELS or 0 in size:  # the guard load_image applies, header only
                self._bad_image(record, path, f"{size[0]}x{size[1]} pixels is empty or above the limit of "
                                              f"{MAX_IMAGE_PIXELS}")
                return False
            grids[key] = get_sliced_grid(size, self.image_processor.max_slice_nums,
                                         self.image_processor.scale_resolution)
        try:
            sample = self._encode(record, grids)
        except NoTargetError:
            self.report["no_target"].append(record.get("id"))
            return False
        except TruncationError:
            self.report["too_long"].append(record.get("id"))
            return False
        if sample["truncated_from"] is not None:  # kept, but the model never sees its end: said in the summary
            self.report["truncated"].append(record.get("id"))
        return True

    def _encode(self, record: dict, grids: dict) -> dict:
        try:
            conversation, order = place_images(record["conversations"], grids, self.query_num,
                                               self.question_first) if grids else \
                (record["conversations"], [])
            sample = conversation_to_ids(conversation, self.tokenizer, self.model_max_length, self.query_num,
                                         self.token_ids)
        except (NoTargetError, TruncationError):
            raise
        except ValueError as err:
            raise ValueError(f"{self._where(record)}: {err}") from None
        sample["order"] = order
        return sample

    def format_line(self) -> str:
        """"data: N records, format F (detected|given) from PATH": printed once per file by training."""
        return describe(self.data_path, self.num_read, self.format_name, self.data_format)

    def summary(self) -> str:
        r = self.report
        parts = [f"{self.data_path}: {len(self.records)} of {self.num_read} records used"]
        if r["bad_images"]:
            parts.append(f"{len(r['bad_images'])} with bad images {r['bad_images'][:10]}")
        if r["no_target"]:
            parts.append(f"{len(r['no_target'])} without target tokens (ids {r['no_target'][:10]})")
        if r["too_long"]:
            parts.append(f"{len(r['too_long'])} whose images exceed model_max_length "
                         f"{self.model_max_length} (ids {r['too_long'][:10]})")
        if r["truncated"]:
            parts.append(f"{len(r['truncated'])} cut at model_max_length {self.model_max_length} "
                         f"(ids {r['truncated'][:10]})")
        return "; ".join(parts)

    # ---- samples ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def load(self, record: dict) -> dict:
        """One record -> one sample (decodes and slices its images)."""
        processed = {}
        for key, relative in image_entries(record).items():
            path = self._path(relative)
            try:
                processed[key] = self.image_processor(path)
            except (OSError, ValueError) as err:  # FileNotFoundError is an OSError
                raise BadImageError(f"{self._where(record)}: image {str(path)!r}: {err}") from err
        sample = self._encode(record, {k: p["grid"] for k, p in processed.items()})
        sample.pop("truncated_from")
        views = [processed[k] for k in sample.pop("order")]
        sample["pixel_values"] = [strip for p in views for strip in p["pixel_values"]]
        sample["tgt_sizes"] = torch.cat([p["tgt_sizes"] for p in views]) if views else \
            torch.zeros(0, 2, dtype=torch.int32)
        if len(sample["image_bound"]) != len(sample["pixel_values"]):
            raise ValueError(f"{self._where(record)}: {len(sample['image_bound'])} image spans for "
                             f"{len(sample['pixel_values'])} views")
        return sample

    def __getitem__(self, index: int) -> dict:
        if not -len(self.records) <= index < len(self.records):
            # Also ends plain iteration (`for sample in dataset`), which stops at the first IndexError.
            raise IndexError(f"index {index} out of range for {len(self.records)} records")
        index %= len(self.records)
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                return self.load(record)
            except (BadImageError, NoTargetError, TruncationError) as err:
                if not self.skip_bad_images:
                    raise
                self.failed_at_load += 1
                logger.warning("skipping record at load time (%d so far): %s", self.failed_at_load, err)
        raise RuntimeError(f"{self.data_path}: no record could be loaded")
