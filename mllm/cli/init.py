"""`mllm init`: write a randomly initialised checkpoint (weights, config, tokenizer) of a preset.

The tokenizer of a fresh checkpoint is the project's own byte-level BPE, trained on a text corpus (by default
the synthetic scene world's vocabulary), and the LLM's vocabulary is sized to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm.cli.arguments import positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm init", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="tiny (CPU) or minicpmv-2.6 (8B; needs ~32 GB)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=positive_int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="write over a non-empty --out (e.g. a checkpoint)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mllm.model.random_checkpoint import CheckpointExistsError, make_random_checkpoint
    from mllm.world.corpus import default_corpus

    try:
        model, tokenizer = make_random_checkpoint(args.out, args.preset, texts=default_corpus(),
                                                  vocab_size=args.vocab_size, seed=args.seed,
                                                  overwrite=args.overwrite)
    except CheckpointExistsError as err:
        print(f"mllm init: {err}", file=sys.stderr)
        return 2
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote a random {args.preset} checkpoint ({count:,} parameters, vocabulary {len(tokenizer)}) to {args.out}")
    return 0
