"""`mllm logp`: arguments -> `mllm.train.logp.compute_reference_logps`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mllm.cli.arguments import positive_int
from mllm.train import logp


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm logp", description=logp.__doc__.split("\n\n")[0])
    parser.add_argument("--model", "--model_name_or_path", dest="model", required=True,
                        help="the reference model folder (the policy's starting point)")
    parser.add_argument("--data_path", type=Path, required=True, help="preference JSON (list of pairs)")
    parser.add_argument("--image_folder", default=".", help="folder the records' image_path values are relative to")
    parser.add_argument("--ref_name", default="ref", help="cache name part: {stem}.{ref_name}.logp.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="cache file (default: next to the data file)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="pairs per forward (2x rows)")
    parser.add_argument("--max_slice_nums", type=positive_int, default=None)
    parser.add_argument("--model_max_length", type=positive_int, default=2048)
    parser.add_argument("--dtype", choices=list(logp.DTYPES), default="float32",
                        help="weights dtype; use the dtype the policy trains in, or the step-0 check fails")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--on_stale", choices=["error", "recompute"], default="error",
                        help="what to do with a cache computed for another model, data file or setting")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = logp.compute_reference_logps(args.model, args.data_path, args.image_folder, args.ref_name,
                                            args.batch_size, args.out, args.max_slice_nums, args.model_max_length,
                                            args.dtype, args.device, args.on_stale)
    except (logp.StaleCacheError, logp.NotACacheError) as err:
        print(f"mllm logp: {err}", file=sys.stderr)
        return 1
    print(f"reference log-probs: {path}")
    return 0
