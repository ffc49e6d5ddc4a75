"""Prompt text + images -> model inputs (facts sheet §5.1, §5.2, §6.6, §7.3).

A prompt marks each image with the literal `(<image>./</image>)`, parentheses included. Each marker is
replaced, before tokenization, by the image's placeholder text

    <image_id>k</image_id><image>{<unk> x Q}</image><slice>{<unk> x Q}</slice><slice>...</slice>\\n<slice>...

(`<image_id>` part only with use_image_id; one `<slice>` group per cell, rows joined by "\\n", no newline after
`</image>`). The model later overwrites the Q `<unk>` positions of each view with that view's Q resampler
vectors; `image_bound` lists those spans as [start, end) pairs, source view first, then slices row-major,
matching the order of `pixel_values`.

Pieces the training code reuses: `image_placeholder`, `expand_image_markers`, `sliced_image_ids` (the training
numbering of §8.1.7) and `find_image_bound`.
"""

from __future__ import annotations

from collections.abc import Sequence

import os

import torch
from transformers import ProcessorMixin

from mllm.model.image_processing import ImageProcessor
from mllm.model.tokenization import special_token_ids

IMAGE_MARKER = "(<image>./</image>)"  # the inference marker, with parentheses (§7.3)


def image_placeholder(grid: Sequence[int] | None, query_num: int = 64, image_id: int | None = None) -> str:
    """Placeholder text of one image: optional `<image_id>k</image_id>`, the source view, then the slice rows."""
    unks = "<unk>" * query_num
    text = f"<image_id>{image_id}</image_id>" if image_id is not None else ""
    text += f"<image>{unks}</image>"
    if grid is not None:
        cols, rows = grid
        text += "\n".join(f"<slice>{unks}</slice>" * cols for _ in range(rows))
    return text


def sliced_image_ids(grids: Sequence[Sequence[int] | None]) -> list[int | None]:
    """Training numbering (§8.1.7): only sliced images get an `<image_id>`, and only they advance the counter."""
    ids, counter = [], 0
    for grid in grids:
        ids.append(counter if grid is not None else None)
        counter += grid is not None
    return ids


def expand_image_markers(text: str, grids: Sequence[Sequence[int] | None], query_num: int = 64,
                         image_ids: Sequence[int | None] | None = None, marker: str = IMAGE_MARKER) -> str:
    """Replace the k-th `marker` in `text` by the placeholder of image k (grid `grids[k]`, id `image_ids[k]`).

    image_ids defaults to 0, 1, 2, ... (the inference numbering); pass `sliced_image_ids(grids)` for the
    training numbering or a list of None for no ids. Raises ValueError if the marker count != len(grids).
    """
    parts = text.split(marker)
    if len(parts) - 1 != len(grids):
        raise ValueError(f"prompt has {len(parts) - 1} image markers {marker!r} but {len(grids)} images were given")
    image_ids = list(range(len(grids))) if image_ids is None else list(image_ids)
    if len(image_ids) != len(grids):
        raise ValueError(f"{len(image_ids)} image ids for {len(grids)} images")
    out = [parts[0]]
    for grid, image_id, part in zip(grids, image_ids, parts[1:]):
        out += [image_placeholder(grid, query_num, image_id), part]
    return "".join(out)


def find_image_bound(input_ids: Sequence[int] | torch.Tensor, token_ids: dict, query_num: int | None = None
                     ) -> torch.Tensor:
    """[start, end) positions of every view's `<unk>` run, in textual order: long [n_views, 2] (§5.2).

    start = index of `<image>` or `<slice>` + 1, end = index of `</image>` or `</slice>`. `token_ids` is the
    dict of `special_token_ids`. With `query_num`, every span must hold exactly that many positions.
    """
    ids = torch.as_tensor(input_ids)
    opens = torch.isin(ids, torch.tensor([token_ids["im_start"], token_ids["slice_start"]]))
    closes = torch.isin(ids, torch.tensor([token_ids["im_end"], token_ids["slice_end"]]))
    starts = torch.nonzero(opens).flatten() + 1
    ends = torch.nonzero(closes).flatten()
    if len(starts) != len(ends):
        raise ValueError(f"unbalanced image tokens: {len(starts)} <image>/<slice> but {len(ends)} </image>/</slice>")
    bound = torch.stack([starts, ends], dim=1).long()  # (n_views, 2)
    if query_num is not None and len(bound) and not bool(((bound[:, 1] - bound[:, 0]) == query_num).all()):
        raise ValueError(f"image spans {(bound[:, 1] - bound[:, 0]).tolist()} are not all {query_num} tokens long")
    return bound


class MLLMProcessor(ProcessorMixin):
    """Tokenizer + ImageProcessor -> the batched inputs of MLLMModel (`input_ids`, `pixel_values`, ...).

    A transformers `ProcessorMixin`: `AutoProcessor.from_pretrained(folder)` returns it (after `import mllm`),
    built from the folder's config.json (slicing, query count, image ids) and tokenizer files."""

    def __init__(self, tokenizer, image_processor: ImageProcessor, query_num: int = 64, use_image_id: bool = True):
        super().__init__(tokenizer=tokenizer, image_processor=image_processor)
        self.query_num = query_num
        self.use_image_id = use_image_id
        self.token_ids = special_token_ids(tokenizer)  # fails early if a MiniCPM-V token is missing
        # The reference pads with 0 (§6.6); a tokenizer with its own pad token uses that.
        self.pad_id = self.token_ids["pad"] if self.token_ids["pad"] is not None else 0

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **_) -> "MLLMProcessor":
        """From a model folder (or a hub id in the local cache): its config.json and tokenizer files."""
        from mllm.model.checkpoint import resolve_model_dir
        from mllm.model.configuration import MLLMConfig
        from mllm.model.tokenization import load_tokenizer

        folder = resolve_model_dir(pretrained_model_name_or_path)
        return cls.from_config(load_tokenizer(folder), MLLMConfig.from_pretrained(folder))

    def save_pretrained(self, save_directory: str | os.PathLike, **_) -> None:
        """The tokenizer files (slicing and query count live in the model's config.json)."""
        self.tokenizer.save_pretrained(str(save_directory))

    @classmethod
    def from_config(cls, tokenizer, config) -> "MLLMProcessor":
        """From an MLLMConfig: slice settings, query_num and use_image_id."""
        return cls(tokenizer, ImageProcessor.from_config(config.slice), config.query_num, config.use_image_id)

    def image_placeholder(self, image_index: int, grid: Sequence[int] | None) -> str:
        return image_placeholder(grid, self.query_num, image_index if self.use_image_id else None)

    def _encode_one(self, text: str, images: list, max_length: int | None) -> dict:
        if text.count(IMAGE_MARKER) != len(images):  # fail before decoding and slicing any image
            raise ValueError(f"prompt has {text.count(IMAGE_MARKER)} image markers {IMAGE_MARKER!r} but "
                             f"{len(images)} images were given")
        processed = [self.image_processor(image) for image in images]
        grids = [p["grid"] for p in processed]
        image_ids = list(range(len(images))) if self.use_image_id else [None] * len(images)
        prompt = expand_image_markers(text, grids, self.query_num, image_ids)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        bound = find_image_bound(ids, self.token_ids, self.query_num)
        if max_length is not None and len(ids) > max_length:
            # Cut from the right, but never through an image: every closing token must survive.
            cut_views = (bound[:, 1] >= max_length).nonzero().flatten()  # views whose closing token is lost
            if len(cut_views):
                views_so_far = torch.tensor([len(p["pixel_values"]) for p in processed]).cumsum(0)
                k = int((views_so_far <= cut_views[0]).sum())  # the image that owns the first cut view
                raise ValueError(f"prompt of {len(ids)} tokens exceeds max_length {max_length} and truncation "
                                 f"would cut image {k}")
            ids = ids[:max_length]
        tgt_sizes = [p["tgt_sizes"] for p in processed]
        return {
            "input_ids": ids,
            "image_bound": bound,
            "pixel_values": [strip for p in processed for strip in p["pixel_values"]],
            "tgt_sizes": torch.cat(tgt_sizes) if tgt_sizes else torch.zeros(0, 2, dtype=torch.int32),
            "image_sizes": [p["image_size"] for p in processed],
        }

    def __call__(self, texts: str | list[str], images: list | None = None, max_length: int | None = None,
                 padding_side: str = "left", return_tensors: str = "pt") -> dict:
        """Batch of prompts (each with its `(<image>./</image>)` markers) and their images -> model inputs.

        images: per-prompt lists (`[[img, ...], [...]]`), or a flat list of images for a single prompt; an
        image is anything `load_image` accepts. Returns input_ids long [B, L] (padded with the pad id),
        attention_mask long [B, L] (1 on real tokens, from the lengths), and per sample: pixel_values (list of
        [3, 14, N*14] strips), tgt_sizes (int32 [n_views, 2]), image_bound (long [n_views, 2], shifted by
        the left padding) and image_sizes (list of (w, h)).
        """
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if images is None:
            images = [[] for _ in texts]
        elif images and not all(isinstance(x, (list, tuple)) or x is None for x in images):
            if len(texts) != 1:
                raise ValueError("for a batch of prompts pass one list of images per prompt")
            images = [list(images)]
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(images)} image lists")

        samples = [self._encode_one(t, list(imgs or []), max_length) for t, imgs in zip(texts, images)]
        longest = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), longest), self.pad_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)  # (B, L)
        bounds = []
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            offset = longest - n if padding_side == "left" else 0
            input_ids[b, offset:offset + n] = torch.tensor(s["input_ids"], dtype=torch.long)
            attention_mask[b, offset:offset + n] = 1
            bounds.append(s["image_bound"] + offset)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": [s["pixel_values"] for s in samples],
            "tgt_sizes": [s["tgt_sizes"] for s in samples],
            "image_bound": bounds,
            "image_sizes": [s["image_sizes"] for s in samples],
        }

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


class MiniCPMVProcessor(MLLMProcessor):
    """The class name MiniCPM-V 2.6 folders record in preprocessor_config.json ("processor_class"): registered
    under it, `AutoProcessor` finds this local class there instead of asking for remote code."""


def processor_for(model, tokenizer) -> MLLMProcessor:
    """The processor matching a model's config (image sizes, slicing, query count) and its tokenizer."""
    return MLLMProcessor.from_config(tokenizer, model.config)
