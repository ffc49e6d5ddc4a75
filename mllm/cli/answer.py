"""`mllm answer`: arguments -> `mllm.eval.answer.run`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm.cli.arguments import add_device_arguments, non_negative_int, output_file, positive_int, runtime_of
from mllm.eval import answer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm answer", description=answer.__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped tiny model)")
    parser.add_argument("--questions", type=Path, required=True, help="question jsonl (Object HalBench format: image, question per line) or the exercise's test.json / SFT JSON (the user turn is the question)")
    parser.add_argument("--out", type=output_file, required=True,
                        help="answers jsonl (appended to and resumed; only ever a file of this same run)")
    parser.add_argument("--decoding", choices=["greedy", "sample", "beam"], default="greedy")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--max-new-tokens", type=positive_int, default=512)
    parser.add_argument("--min-new-tokens", type=non_negative_int, default=0)
    parser.add_argument("--image-root", type=Path, default=None, help="folder that image paths are relative to")
    parser.add_argument("--system-prompt", default=None,
                        help="system message; default: the chat template's own, as in training (the exercise's eval "
                             "sends an empty one, --system-prompt '', which a small model trained without it ignores)")
    parser.add_argument("--limit", type=non_negative_int, default=None, help="answer only the first N questions")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    add_device_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it holds answers of another run (or anything else)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.questions.is_file():
        parser.error(f"--questions {args.questions}: no such file")
    import torch

    from mllm.model.checkpoint import CheckpointError
    from mllm.model.loading import default_model_dir

    torch.manual_seed(args.seed)
    runtime = runtime_of(parser, args)
    try:
        stats = answer.run(args.model or str(default_model_dir()), args.questions, args.out, args.decoding,
                           args.batch_size, args.max_new_tokens, args.min_new_tokens, args.image_root,
                           args.system_prompt, args.limit, seed=args.seed, overwrite=args.overwrite,
                           **runtime)
    except answer.AnswersFileError as err:
        print(f"mllm answer: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError) as err:  # a missing model, adapter or a broken checkpoint
        parser.error(str(err))
    print(f"{stats['answered']} answered now, {stats['already_answered']} already in {args.out}, "
          f"{stats['skipped_lines']} malformed line(s) and {stats['skipped_records']} unusable record(s) skipped")
    if stats["questions"] and not stats["answered"] and not stats["already_answered"]:
        print(f"mllm answer: none of the {stats['questions']} question(s) could be answered (see the reasons "
              f"above)", file=sys.stderr)
        return 1
    if not stats["questions"]:
        print(f"mllm answer: {args.questions} holds no usable question (one JSON object per line with image and "
              f"question, or the exercise's test.json format)", file=sys.stderr)
        return 1
    return 0
