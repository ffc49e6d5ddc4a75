"""`mllm merge`: fold a PEFT (LoRA) adapter into its base model and write a plain checkpoint folder.

The result loads anywhere a model folder does (`--model DIR`, `AutoModel.from_pretrained`), with no adapter and
no PEFT at inference. A non-empty --out is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base model folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (a LoRA run's adapter/ or checkpoint-N)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged checkpoint")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
        print(f"mllm merge: {args.out} exists and is not an empty folder; pass --overwrite to write into it",
              file=sys.stderr)
        return 2
    from mllm.model.checkpoint import CheckpointError
    from mllm.model.loading import DTYPES, load_pretrained

    try:
        model, tokenizer, _ = load_pretrained(args.model, dtype=DTYPES[args.dtype], adapter=args.adapter)
    except (FileNotFoundError, CheckpointError) as err:
        parser.error(str(err))
    model.save_pretrained(args.out, tokenizer=tokenizer)
    count = sum(p.numel() for p in model.parameters())
    print(f"merged {args.adapter} into {args.model}: {count:,} parameters written to {args.out}")
    return 0
