"""`mllm grounding prepare`: arguments -> `mllm.data.grounding_prepare.prepare`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm.cli.arguments import positive_int
from mllm.data import grounding_prepare


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mllm grounding prepare", description=grounding_prepare.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring of mllm.data.grounding_prepare for the conventions.")
    p.add_argument("--rec", type=Path, action="append", default=[], help="Shikra REC jsonl (repeatable)")
    p.add_argument("--flickr", type=Path, action="append", default=[],
                   help="Flickr30k-entities jsonl (CWB_flickr30k_*.jsonl; repeatable; for the gc task)")
    p.add_argument("--image-root", type=Path, default=None,
                   help="folder the images are relative to (default: the first annotation file's folder)")
    p.add_argument("--out", type=Path, required=True, help="output JSON list (the report goes to <stem>.report.json)")
    p.add_argument("--tasks", default="rec", help="comma-separated: rec, reg, gc (default rec)")
    p.add_argument("--style", choices=grounding_prepare.STYLES, default="plain", help="box text style (default plain [x0,y0,x1,y1])")
    p.add_argument("--templates", choices=("first", "random"), default="first",
                   help="prompt template per record: always the first (GROUNDING_PROMPT for REC) or a random one")
    pad = p.add_mutually_exclusive_group()
    pad.add_argument("--square-pad", dest="square_pad", action="store_true",
                     help="the exercise's frame: image centred on a white square; padded copies are written")
    pad.add_argument("--no-square-pad", dest="square_pad", action="store_false",
                     help="(default) grid relative to the unpadded image; the model slices it as usual")
    p.add_argument("--padded-dir", type=Path, default=None,
                   help="where --square-pad writes padded images (default <image root>/padded_square)")
    p.add_argument("--per-image", type=positive_int, default=None, help="at most this many REC lines per image")
    p.add_argument("--turns-per-image", type=positive_int, default=1,
                   help="join up to N questions about one image into one multi-turn conversation (default 1)")
    p.add_argument("--mix", type=Path, default=None, help="general SFT JSON list to mix in (same image root)")
    p.add_argument("--mix-ratio", type=float, default=0.0, help="fraction of the output taken from --mix")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the input order")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for path in [*args.rec, *args.flickr, *([args.mix] if args.mix else [])]:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    try:
        options = grounding_prepare.PrepareOptions(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                                                   style=args.style, templates=args.templates, square_pad=args.square_pad,
                                 padded_dir=args.padded_dir, per_image=args.per_image,
                                 turns_per_image=args.turns_per_image, seed=args.seed)
        report = grounding_prepare.prepare(args.out, args.rec, args.flickr, args.image_root, options, args.mix, args.mix_ratio,
                         args.shuffle)
    except ValueError as err:
        parser.error(str(err))
    return 0 if report["total_written"] else 1

