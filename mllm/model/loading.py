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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto` picks CUDA with bfloat16 where a GPU is visible, else the CPU with float32; names otherwise."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to this process")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose auto or one of {sorted(DTYPES)}")
    return device, DTYPES[dtype]


def load_pretrained(folder: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model in eval mode, tokenizer, processor) for a folder with config, safetensors and tokenizer files."""
    model = MLLMModel.from_pretrained(folder, dtype=dtype, device=device).eval()
    tokenizer = load_tokenizer(folder)
    return model, tokenizer, processor_for(model, tokenizer)
