"""`mllm synth`: arguments -> `mllm.world.synth.generate`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from mllm.cli.arguments import non_negative_int, positive_int

from mllm.world import synth


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm synth", description=synth.__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder: new, empty, or a world of the same parameters")
    parser.add_argument("--n-train", type=non_negative_int, default=2000)
    parser.add_argument("--n-test", type=non_negative_int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--caption-noise", type=float, default=0.0,
                        help="fraction of train descriptions that mention one object not in the image")
    parser.add_argument("--large-fraction", type=float, default=0.15,
                        help="fraction of images larger than 112x112 or about 4:1 (exercise slicing)")
    parser.add_argument("--max-objects", type=positive_int, default=6)
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="processes (default 1; output bytes do not depend on it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace a world of other parameters in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        written = synth.generate(args.out, args.n_train, args.n_test, args.seed, args.caption_noise,
                                 args.large_fraction, args.max_objects, args.workers, progress=not args.quiet,
                                 overwrite=args.overwrite)
    except synth.WorldDirError as err:
        print(f"mllm synth: {err}", file=sys.stderr)
        return 2
    counts = json.loads(written["meta"].read_text())["counts"]
    print(f"mllm synth: {args.n_train} train + {args.n_test} test images in {written['images_train'].parent} "
          f"({time.perf_counter() - start:.1f} s)")
    for key, path in written.items():
        if key in counts:
            print(f"  {path}  ({counts[key]} records)")
        elif not key.startswith("images"):
            print(f"  {path}")
    return 0
