"""`mllm init`: write a randomly initialised checkpoint (weights, config, tokenizer) of a preset.

The tokenizer of a fresh checkpoint is the project's own byte-level BPE, trained on a text corpus (by default
the synthetic scene world's vocabulary), and the LLM's vocabulary is sized to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def default_corpus() -> list[str]:
    """Texts the tokenizer is trained on when none are given: a small synthetic world's training files."""
    import tempfile

    from mllm.course import tokenizer_corpus
    from mllm.data.synth import generate

    with tempfile.TemporaryDirectory() as folder:
        generate(folder, n_train=100, n_test=0, seed=0, progress=False)
        return tokenizer_corpus(Path(folder))


def make_random_checkpoint(out: str | Path, preset: str = "tiny", texts: list[str] | None = None,
                           vocab_size: int = 1024, seed: int = 0, **config_overrides):
    """Build a tokenizer and a random model of `preset` whose vocabulary matches it; save both to `out`."""
    import torch

    from mllm.model.configuration import MLLMConfig
    from mllm.model.modeling_mllm import MLLMModel
    from mllm.model.tokenization import build_tokenizer

    tokenizer = build_tokenizer(texts or default_corpus(), vocab_size=vocab_size)
    config = MLLMConfig.from_preset(preset)
    config.llm.vocab_size = len(tokenizer)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = MLLMModel(config)
    model.save_pretrained(out, tokenizer=tokenizer)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mllm init", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="tiny (CPU) or minicpmv-2.6 (8B; needs ~32 GB)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, tokenizer = make_random_checkpoint(args.out, args.preset, vocab_size=args.vocab_size, seed=args.seed)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote a random {args.preset} checkpoint ({count:,} parameters, vocabulary {len(tokenizer)}) to {args.out}")
    return 0
