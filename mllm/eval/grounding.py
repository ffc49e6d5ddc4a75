"""Visual-grounding (REC) accuracy: Acc@IoU>=0.5 per split, with parse failures counted separately.

A prediction is model text containing one box on the `grid` (0..1000) scale; a reference is the GT pixel box
(xyxy in the original image) with the image's width and height. The predicted box is parsed
(`mllm.data.boxes.parse_box`), mapped back to pixels with the same convention used to build the training
targets (`grid_to_pixel`, square padding by default) and compared with the raw pixel GT box. The GT is not
quantised first (the exercise compares with the quantised GT; the difference is under one grid cell).

A parse failure (no box, or an inverted one) counts as a miss and is also reported as a count and a rate per
split (eval_facts §5.10). Threshold: IoU >= 0.5, as in Qwen-VL and the exercise (Shikra uses > 0.5).
The eight RefCOCO/RefCOCO+/RefCOCOg splits print first, in the papers' order; any other split follows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mllm.data.boxes import grid_to_pixel, iou, parse_box

STANDARD_SPLITS = ("refcoco_val", "refcoco_testA", "refcoco_testB", "refcoco+_val", "refcoco+_testA",
                   "refcoco+_testB", "refcocog_val", "refcocog_test")


def canonical_split(name: str) -> str:
    """Spelling of a standard split ("REC_refcoco_unc_val", "refcoco/testa" -> "refcoco_testA"); else `name`."""
    key = name.lower().replace("/", "_").replace("-", "_").replace(".jsonl", "").replace(".json", "")
    key = key.removeprefix("rec_")
    for dataset_variant in ("_unc", "_umd", "_google"):
        key = key.replace(dataset_variant, "")
    by_lower = {s.lower(): s for s in STANDARD_SPLITS}
    return by_lower.get(key, name)


def _empty_split() -> dict[str, Any]:
    return {"n": 0, "correct": 0, "parse_failures": 0, "iou_sum": 0.0, "formats": {}}


def _finish(stats: dict[str, Any]) -> dict[str, Any]:
    n = stats["n"]
    return {"n": n, "correct": stats["correct"], "accuracy": stats["correct"] / n if n else 0.0,
            "parse_failures": stats["parse_failures"], "parse_failure_rate": stats["parse_failures"] / n if n else 0.0,
            "mean_iou": stats["iou_sum"] / n if n else 0.0, "formats": stats["formats"]}


def score(predictions: list[str], references: list[dict], grid: int = 1000, square_pad: bool = True,
          threshold: float = 0.5) -> dict:
    """Acc@IoU>=threshold per split and overall of predicted box texts against GT pixel boxes.

    Each reference is {"bbox": [x0,y0,x1,y1] pixels, "width", "height", optional "split" (default "all")}.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    splits: dict[str, dict[str, Any]] = {}
    overall = _empty_split()
    samples = []
    for text, ref in zip(predictions, references):
        split = canonical_split(str(ref.get("split") or "all"))
        parsed = parse_box(text or "", grid)
        if parsed is None:
            box, fmt, overlap = None, None, 0.0
        else:
            grid_box, fmt = parsed
            box = grid_to_pixel(grid_box, ref["width"], ref["height"], grid, square_pad)
            overlap = iou(box, ref["bbox"])
        correct = overlap >= threshold
        for stats in (splits.setdefault(split, _empty_split()), overall):
            stats["n"] += 1
            stats["correct"] += correct
            stats["parse_failures"] += parsed is None
            stats["iou_sum"] += overlap
            if fmt is not None:
                stats["formats"][fmt] = stats["formats"].get(fmt, 0) + 1
        samples.append({"split": split, "pred_box": box, "format": fmt, "iou": overlap, "correct": correct})
    return {
        "splits": {name: _finish(stats) for name, stats in splits.items()},
        "overall": _finish(overall),
        "settings": {"grid": grid, "square_pad": square_pad, "threshold": threshold, "iou_rule": ">="},
        "samples": samples,
    }


def format_table(results: dict) -> str:
    """Accuracy and parse-failure rate (x100) per split: the standard eight first, then others, then overall."""
    splits = results["splits"]
    names = [s for s in STANDARD_SPLITS if s in splits] + sorted(s for s in splits if s not in STANDARD_SPLITS)
    threshold = results["settings"]["threshold"]
    width = max([len(n) for n in names] + [len("overall")])
    lines = [f"{'split':<{width}}{'n':>8}{f'Acc@{threshold:g}':>10}{'parse fail %':>14}"]
    for name, stats in [*((n, splits[n]) for n in names), ("overall", results["overall"])]:
        lines.append(f"{name:<{width}}{stats['n']:>8}{100 * stats['accuracy']:>10.2f}"
                     f"{100 * stats['parse_failure_rate']:>14.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- I/O


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1))
    os.replace(tmp, path)


def read_answers(path: str | Path) -> tuple[list[str], list[dict], list[dict]]:
    """(predictions, references, skipped lines) from an answers jsonl whose lines carry `answer` and
    `metainfos` {bbox, width, height, split} (the fields may also sit at the top level)."""
    predictions, references, skipped = [], [], []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            skipped.append({"line": line_no, "reason": f"malformed JSON: {err.msg}"})
            continue
        meta = {**record, **(record.get("metainfos") or {})}
        missing = [k for k in ("bbox", "width", "height") if meta.get(k) is None]
        if missing:
            skipped.append({"line": line_no, "reason": f"missing {', '.join(missing)}"})
            continue
        predictions.append(record.get("answer") or "")
        references.append({"bbox": meta["bbox"], "width": meta["width"], "height": meta["height"],
                           "split": meta.get("split") or meta.get("dataset_name") or "all"})
    return predictions, references, skipped


def score_files(answers: str | Path, grid: int = 1000, square_pad: bool = True, threshold: float = 0.5) -> dict:
    """Score an answers jsonl; the result also lists the lines that could not be read."""
    predictions, references, skipped = read_answers(answers)
    result = score(predictions, references, grid, square_pad, threshold)
    result["skipped"] = skipped
    result["answers"] = str(answers)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mllm eval grounding", description=__doc__.split("\n")[0])
    p.add_argument("--answers", required=True, help="answers jsonl: answer + metainfos{bbox,width,height,split}")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--grid", type=int, default=1000, help="coordinate grid of the model's boxes")
    p.add_argument("--no-square-pad", dest="square_pad", action="store_false",
                   help="grid coordinates are per-axis fractions of the original image (no square padding)")
    p.add_argument("--threshold", type=float, default=0.5, help="IoU needed for a hit (>=)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Scores `args.answers`, writes `args.out`, prints the table; a `--model` path can generate answers first."""
    result = score_files(args.answers, args.grid, args.square_pad, args.threshold)
    for entry in result["skipped"]:
        print(f"grounding: skipped line {entry['line']}: {entry['reason']}", file=sys.stderr)
    write_json_atomic(args.out, result)
    print(format_table(result))
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
