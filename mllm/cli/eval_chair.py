"""`mllm eval chair`: arguments -> `mllm.eval.chair.score`."""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from mllm.eval import chair
from mllm.jsonio import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mllm eval chair", description=chair.__doc__.split("\n")[0])
    p.add_argument("--answers", required=True, help="answers jsonl (or JSON list) with captions and image ids")
    p.add_argument("--caption-key", default="answer")
    p.add_argument("--image-id-key", default="image_id", help="looked up at top level, else in metainfos")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--chair-gt", help="chair_gt.json: vocabulary, double_words and image objects")
    source.add_argument("--coco-annotations", help="directory with instances_/captions_{train,val}2014.json")
    source.add_argument("--chair-pkl", help="the exercise's chair_300.pkl (needs --trust-pickle)")
    p.add_argument("--vocabulary", choices=chair.COCO_VOCABULARIES, default=None,
                   help="COCO synonym tables for --coco-annotations/--chair-pkl: 'original' (default; the CHAIR "
                        "paper's list and rules, quirks included, comparable with published numbers) or 'mllm' "
                        "(this project's revised table); a --chair-gt file carries its own")
    p.add_argument("--cache", help="JSON ground-truth cache (default: next to the annotations or the pickle, "
                                   "one per vocabulary)")
    p.add_argument("--trust-pickle", action="store_true", help="allow reading --chair-pkl (restricted unpickler)")
    p.add_argument("--out", required=True, help="result JSON")
    return p


def load_ground_truth(args: argparse.Namespace) -> tuple[chair.Vocabulary, dict]:
    if args.chair_gt:
        if args.vocabulary:  # silently ignoring it would report numbers under tables the user did not ask for
            raise ValueError(f"--vocabulary applies to COCO ground truth; {args.chair_gt} carries its own vocabulary")
        return chair.load_chair_gt(args.chair_gt)
    name = args.vocabulary or chair.COCO_VOCABULARIES[0]
    vocab = chair.Vocabulary.coco(name)
    if args.coco_annotations:
        # one default cache per vocabulary: caption objects depend on the tables, so switching would rebuild
        cache = args.cache or Path(args.coco_annotations) / f"chair_gt_coco2014_{name}.json"
        return vocab, chair.build_coco_gt(args.coco_annotations, vocab, cache)
    cache = Path(args.cache) if args.cache else Path(args.chair_pkl).with_suffix(f".chair_gt_{name}.json")
    return vocab, chair.convert_chair_pickle(args.chair_pkl, cache, args.trust_pickle, name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        vocab, gt = load_ground_truth(args)
    except (PermissionError, FileNotFoundError, pickle.UnpicklingError, ValueError) as err:
        print(f"mllm eval chair: {err}", file=sys.stderr)
        return 2
    records, io_skipped = chair.read_answers(args.answers)
    captions, line_of = [], []
    for line_no, record in records:
        image_id = chair.image_id_of(record, args.image_id_key)
        if image_id is None:
            io_skipped.append({"line": line_no, "reason": f"no {args.image_id_key!r} (top level or metainfos)"})
            continue
        captions.append({"image_id": image_id, "caption": record.get(args.caption_key)})
        line_of.append(line_no)
    for entry in io_skipped:
        print(f"chair: skipped line {entry['line']}: {entry['reason']}", file=sys.stderr)
    if records and not any(isinstance(c["caption"], str) for c in captions):
        keys = sorted({k for _, record in records if isinstance(record, dict) for k in record})
        print(f"mllm eval chair: no record of {args.answers} has the caption key {args.caption_key!r}; its records "
              f"have {keys}: pass the right one with --caption-key", file=sys.stderr)
        return 2
    try:
        result = chair.score(captions, gt, vocab)
    except ValueError as err:  # unknown image ids, or nothing to score
        print(f"mllm eval chair: {err}", file=sys.stderr)
        return 2
    for entry in result["skipped"]:
        entry["line"] = line_of[entry.pop("index")]
    result["skipped"] = io_skipped + result["skipped"]
    result["counts"]["skipped"] = len(result["skipped"])
    result["answers"] = str(args.answers)
    write_json_atomic(args.out, result)
    print(chair.format_table(result))
    return 0

