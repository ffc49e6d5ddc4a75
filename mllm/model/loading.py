"""Load everything inference needs from one checkpoint folder: model, tokenizer, processor."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mllm.model.modeling_mllm import MLLMModel
from mllm.model.processing import processor_for
from mllm.model.tokenization import load_tokenizer

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-base"


def default_model_dir() -> Path:
    """The tiny base model shipped inside the package: the default `--model` of every command."""
    if not (SHIPPED_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the shipped model is missing from {SHIPPED_MODEL}; pass --model DIR")
    return SHIPPED_MODEL


def load_pretrained(folder: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model in eval mode, tokenizer, processor) for a folder with config, safetensors and tokenizer files."""
    model = MLLMModel.from_pretrained(folder, dtype=dtype, device=device).eval()
    tokenizer = load_tokenizer(folder)
    return model, tokenizer, processor_for(model, tokenizer)
