"""`mllm eval grounding`: arguments -> `mllm.eval.grounding.score_files` / `evaluate_model`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm.cli.arguments import add_device_arguments, non_negative_int, positive_int, runtime_of
from mllm.eval import grounding
from mllm.jsonio import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mllm eval grounding", description=grounding.__doc__.split("\n")[0],
        epilog="Two uses: score an answers file (--answers, --out), or run a model on REC files first "
               "(--model with --rec or --refcoco-dir, and --out-dir).")
    p.add_argument("--answers", help="answers jsonl: answer + metainfos{bbox,width,height,split}")
    p.add_argument("--out", help="result JSON (default with --model: <out-dir>/grounding.json)")
    p.add_argument("--grid", type=positive_int, default=1000, help="coordinate grid of the model's boxes")
    pad = p.add_mutually_exclusive_group()
    pad.add_argument("--square-pad", dest="square_pad", action="store_true", default=None,
                     help="grid coordinates are on the image centred in a square (the exercise's frame; the "
                          "default when scoring an answers file whose lines do not say)")
    pad.add_argument("--no-square-pad", dest="square_pad", action="store_false",
                     help="grid coordinates are per-axis fractions of the original image (the default with "
                          "--model: the course's base model is trained so)")
    p.add_argument("--threshold", type=float, default=0.5, help="IoU needed for a hit (>=)")
    model = p.add_argument_group("running a model (--model)")
    model.add_argument("--model", help="checkpoint folder to answer with")
    model.add_argument("--rec", type=Path, action="append", default=[], help="Shikra REC jsonl (repeatable)")
    model.add_argument("--refcoco-dir", type=Path, help="folder with the eight REC_refcoco*_{unc,umd}_*.jsonl files")
    model.add_argument("--image-root", type=Path, help="folder the REC img_path values are relative to "
                                                       "(default: each REC file's folder)")
    model.add_argument("--out-dir", type=Path, help="questions, resumable answers, pictures and grounding.json")
    model.add_argument("--style", choices=("plain", "qwen"), default="plain", help="prompt and answer box style")
    model.add_argument("--template", type=non_negative_int, default=0, help="index of the REC prompt template (0: GROUNDING_PROMPT)")
    model.add_argument("--limit", type=non_negative_int, help="ask only the first N expressions of each split")
    model.add_argument("--fraction", type=float, help="ask only the first fraction of each split (exercise: 0.2)")
    model.add_argument("--batch-size", type=positive_int, default=16)
    model.add_argument("--max-new-tokens", type=positive_int, help="default 32 (plain) / 64 (qwen)")
    model.add_argument("--system-prompt", default=None,
                       help="system message (default: the chat template's own, as in SFT training)")
    model.add_argument("--draw", type=non_negative_int, default=0, help="draw N sampled cases and a contact sheet")
    model.add_argument("--seed", type=int, default=0, help="seed of the drawn sample")
    add_device_arguments(p)
    return p


def run(args: argparse.Namespace) -> dict:
    """Scores `args.answers` (or first answers the REC files with `args.model`), writes the JSON, prints the table."""
    if args.model:
        rec_files = list(args.rec) + (grounding.refcoco_files(args.refcoco_dir) if args.refcoco_dir else [])
        result = grounding.evaluate_model(args.model, rec_files, args.out_dir, args.image_root, args.style,
                                          bool(args.square_pad), args.template, args.limit, args.fraction, args.batch_size,
                                          args.max_new_tokens, args.system_prompt, args.draw, args.seed, args.threshold,
                                          runtime=args.runtime)
        if args.out:
            write_json_atomic(args.out, result)
    else:
        square_pad = True if args.square_pad is None else args.square_pad
        result = grounding.score_files(args.answers, args.grid, square_pad, args.threshold)
        write_json_atomic(args.out, result)
    for entry in result["skipped"]:
        print(f"grounding: skipped line {entry['line']}: {entry['reason']}", file=sys.stderr)
    print(grounding.format_table(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model:
        if not (args.rec or args.refcoco_dir) or args.out_dir is None:
            parser.error("--model needs --rec FILE or --refcoco-dir DIR, and --out-dir")
        for path in args.rec:
            if not path.is_file():
                parser.error(f"--rec {path}: no such file")
        args.runtime = runtime_of(parser, args)
        try:
            run(args)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
        return 0
    if not args.answers or not args.out:
        parser.error("give --answers and --out (or --model with REC files)")
    run(args)
    return 0

