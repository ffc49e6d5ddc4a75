"""A randomly initialised checkpoint (weights, config, tokenizer) of a preset.

The tokenizer of a fresh checkpoint is the project's own byte-level BPE, trained on the texts given (`mllm init`
uses the synthetic scene world's vocabulary, `mllm.world.corpus.default_corpus`), and the LLM's vocabulary is
sized to it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mllm.model.configuration import MLLMConfig
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import build_tokenizer


class CheckpointExistsError(ValueError):
    """The output folder is not empty: random weights never silently replace a (possibly trained) checkpoint."""


def make_random_checkpoint(out: str | Path, preset: str = "tiny", *, texts: list[str], vocab_size: int = 1024,
                           seed: int = 0, overwrite: bool = False, **config_overrides):
    """Build a tokenizer on `texts` and a random model of `preset` whose vocabulary matches it; save both to `out`.

    A non-empty `out` is refused (CheckpointExistsError) unless `overwrite`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        what = "a checkpoint" if (out / "config.json").exists() else "files"
        raise CheckpointExistsError(f"{out} already holds {what}; random weights would replace them. Choose a "
                                    "new folder, or pass --overwrite")
    if not texts:
        raise ValueError("make_random_checkpoint needs the texts its tokenizer is trained on")
    tokenizer = build_tokenizer(texts, vocab_size=vocab_size)
    config = MLLMConfig.from_preset(preset)
    config.llm.vocab_size = len(tokenizer)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = MLLMModel(config)
    model.save_pretrained(out, tokenizer=tokenizer)
    return model, tokenizer
