"""Visual-grounding (REC) accuracy: Acc@IoU>=0.5 per split, with parse failures counted separately.

A prediction is model text containing one box on the `grid` (0..1000) scale; a reference is the GT pixel box
(xyxy in the original image) with the image's width and height. The predicted box is parsed
(`mllm.data.boxes.parse_box`), mapped back to pixels with the same convention used to build the training
targets (`grid_to_pixel`, square padding by default) and compared with the raw pixel GT box. The GT is not
quantised first (the exercise compares with the quantised GT; the difference is under one grid cell).

A parse failure (no box, or an inverted one) counts as a miss and is also reported as a count and a rate per
split (eval_facts §5.10). Threshold: IoU >= 0.5, as in Qwen-VL and the exercise (Shikra uses > 0.5).
The eight RefCOCO/RefCOCO+/RefCOCOg splits print first, in the papers' order; any other split follows.

With `--model`, REC files (`--rec`, or the eight Shikra files of `--refcoco-dir`) are first turned into one
question file per split (prompt `GROUNDING_PROMPT` by default) and answered with `mllm.eval.answer.run`:
greedy, batched, appended and resumable, so a killed 10,000-item split continues where it stopped. The
question lines record the frame (`square_pad`) so the answers file scores itself; the default frame there is
the unpadded image, the course's training convention (with `--square-pad` the images are padded white first,
as in training with `mllm grounding prepare --square-pad`). `--draw N` writes pictures of N sampled cases.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from mllm.data.boxes import grid_to_pixel, iou, parse_box
from mllm.jsonio import write_json_atomic

GRID = 1000  # the 0..1000 box grid of the exercise (and of Qwen-VL) that `ground` reads answers on
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

    Each reference is {"bbox": [x0,y0,x1,y1] pixels, "width", "height", optional "split" (default "all"),
    optional "square_pad" (the frame its answer was asked in; overrides the `square_pad` argument)}.
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
            box = grid_to_pixel(grid_box, ref["width"], ref["height"], grid, ref.get("square_pad", square_pad))
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


def reference_problem(meta: dict) -> str | None:
    """Why a ground-truth record cannot be scored (non-finite or inverted box, empty image size), or None."""
    try:
        box = [float(v) for v in meta["bbox"]]
        width, height = float(meta["width"]), float(meta["height"])
    except (TypeError, ValueError):
        return f"bbox / width / height not numbers: {meta.get('bbox')!r}, {meta.get('width')!r}x{meta.get('height')!r}"
    if len(box) != 4 or not all(math.isfinite(v) for v in box + [width, height]):
        return f"ground-truth box {meta['bbox']!r} or size {meta['width']!r}x{meta['height']!r} is not finite"
    if width <= 0 or height <= 0:
        return f"image size {meta['width']}x{meta['height']} is empty"
    if box[2] <= box[0] or box[3] <= box[1]:
        return f"ground-truth box {meta['bbox']!r} is empty or inverted"
    return None


def read_answers(path: str | Path) -> tuple[list[str], list[dict], list[dict]]:
    """(predictions, references, skipped lines) from an answers jsonl whose lines carry `answer` and
    `metainfos` {bbox, width, height, split} (the fields may also sit at the top level); `square_pad`,
    `expression` and `image_file`, when there, are kept in the reference."""
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
        unusable = reference_problem(meta)
        if unusable:  # a reference nobody could hit is not a miss of the model's: skip and count it
            skipped.append({"line": line_no, "reason": unusable})
            continue
        predictions.append(record.get("answer") or "")
        reference = {"bbox": meta["bbox"], "width": meta["width"], "height": meta["height"],
                     "split": meta.get("split") or meta.get("dataset_name") or "all"}
        reference.update({k: meta[k] for k in ("square_pad", "expression", "image_file") if k in meta})
        references.append(reference)
    return predictions, references, skipped


def score_files(answers: str | Path, grid: int = 1000, square_pad: bool = True, threshold: float = 0.5) -> dict:
    """Score an answers jsonl; the result also lists the lines that could not be read."""
    predictions, references, skipped = read_answers(answers)
    result = score(predictions, references, grid, square_pad, threshold)
    result["skipped"] = skipped
    result["answers"] = str(answers)
    return result


# ------------------------------------------------------------------------------------- a model on REC files

# Shikra's file for each standard split (eval_facts §3.3) and its size (§3.2; a full split must have it).
SHIKRA_FILES = {
    "refcoco_val": "REC_refcoco_unc_val.jsonl", "refcoco_testA": "REC_refcoco_unc_testA.jsonl",
    "refcoco_testB": "REC_refcoco_unc_testB.jsonl", "refcoco+_val": "REC_refcoco+_unc_val.jsonl",
    "refcoco+_testA": "REC_refcoco+_unc_testA.jsonl", "refcoco+_testB": "REC_refcoco+_unc_testB.jsonl",
    "refcocog_val": "REC_refcocog_umd_val.jsonl", "refcocog_test": "REC_refcocog_umd_test.jsonl",
}
EXPECTED_SIZES = {"refcoco_val": 10834, "refcoco_testA": 5657, "refcoco_testB": 5095, "refcoco+_val": 10758,
                  "refcoco+_testA": 5726, "refcoco+_testB": 4889, "refcocog_val": 4896, "refcocog_test": 9602}
DEFAULT_MAX_NEW_TOKENS = {"plain": 32, "qwen": 64}  # a plain box is 17 digit/punctuation tokens at most


def refcoco_files(folder: str | Path) -> list[Path]:
    """The standard split files present in `folder`, in the papers' order."""
    found = [Path(folder) / name for name in SHIKRA_FILES.values() if (Path(folder) / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{folder}: none of the Shikra REC files {list(SHIKRA_FILES.values())}")
    return found


def write_questions(rec_file: Path, split: str, out: Path, image_root: Path, prompt: str, square_pad: bool,
                    padded_dir: Path | None, limit: int | None = None, fraction: float | None = None) -> dict:
    """REC lines -> an `mllm answer` question file (absolute image paths, GT and frame in the extra fields).
    Missing images and malformed lines are counted and listed, not asked."""
    from mllm.data.grounding_prepare import pad_image_to_square

    lines = [line for line in Path(rec_file).read_text().splitlines() if line.strip()]
    total = len(lines)
    if fraction is not None:
        lines = lines[: int(len(lines) * fraction)]  # the exercise's first-1/5 subsets (not shuffled)
    if limit is not None:
        lines = lines[:limit]
    stats = {"split": split, "file": str(rec_file), "lines_in_file": total, "asked": 0, "missing_images": [],
             "malformed": []}
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
            path, expression, bbox = rec["img_path"], rec["expression"], rec["bbox"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            stats["malformed"].append(f"{rec_file}:{number}: {type(err).__name__}: {err}")
            continue
        image_file = (image_root / path).resolve()
        if not image_file.is_file():
            stats["missing_images"].append(f"{rec_file}:{number}: {image_file}")
            continue
        if rec.get("width") is None or rec.get("height") is None:
            from PIL import Image

            with Image.open(image_file) as image:
                rec["width"], rec["height"] = image.size
        asked = image_file
        if square_pad:
            asked = (padded_dir / path).resolve()
            if not asked.is_file():
                from PIL import Image

                asked.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(image_file) as image:
                    pad_image_to_square(image).save(asked)
        rows.append({"image": str(asked), "question": prompt.format(expression=expression),
                     "image_id": rec.get("image_id", path), "expression": expression, "bbox": bbox,
                     "width": rec["width"], "height": rec["height"], "split": split, "square_pad": square_pad,
                     "image_file": str(image_file), "line": number})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, out)
    stats["asked"] = len(rows)
    return stats


def _weights_stamp(model_dir: str | Path) -> list:
    """(name, size, mtime) of the weight files: a model retrained in the same folder gets new answers."""
    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    return [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]


def _check_settings(path: Path, settings: dict) -> None:
    """An answers file may only be resumed under the settings that began it."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            raise ValueError(f"{path.parent} holds answers made with other settings ({old} != {settings}); "
                             "use another --out-dir or delete it")
    else:
        write_json_atomic(path, settings)


def draw_samples(result: dict, references: list[dict], predictions: list[str], out_dir: Path, n: int,
                 seed: int = 0) -> list[str]:
    """One PNG per sampled case (GT green, prediction red, expression caption) and `contact_sheet.png`."""
    import random

    from PIL import Image

    from mllm.eval.grounding_draw import contact_sheet, draw_case

    candidates = [i for i, r in enumerate(references) if r.get("image_file")]
    chosen = sorted(random.Random(f"draw/{seed}").sample(candidates, min(n, len(candidates))))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, pictures = [], []
    for k, i in enumerate(chosen):
        ref, sample = references[i], result["samples"][i]
        verdict = f"IoU {sample['iou']:.2f}" if sample["pred_box"] is not None else f"no box in {predictions[i]!r}"
        with Image.open(ref["image_file"]) as image:
            picture = draw_case(image, f"{ref.get('expression', '?')} ({verdict})", ref["bbox"], sample["pred_box"])
        path = out_dir / f"{k:02d}_{sample['split']}_{i}.png"
        picture.save(path)
        paths.append(str(path))
        pictures.append(picture)
    if pictures:
        sheet = out_dir / "contact_sheet.png"
        contact_sheet(pictures).save(sheet)
        paths.append(str(sheet))
    return paths


def evaluate_model(model_dir: str | Path, rec_files: list[Path], out_dir: Path, image_root: Path | None = None,
                   style: str = "plain", square_pad: bool = False, template: int = 0, limit: int | None = None,
                   fraction: float | None = None, batch_size: int = 16, max_new_tokens: int | None = None,
                   system_prompt: str | None = None, draw: int = 0, seed: int = 0, threshold: float = 0.5,
                   quiet: bool = False, runtime: dict | None = None) -> dict:
    """Ask `model_dir` for the box of every expression of each REC file (one split per file), score, write
    `out_dir/grounding.json`. Answers go to `out_dir/answers/<split>.jsonl` and resume like `mllm answer`.

    `system_prompt=None` uses the chat template's default system message, as SFT training does.
    `image_root` defaults to each REC file's folder. `runtime`: device, dtype, attn, adapter (as `answer.run`)."""
    from mllm.data.grounding_prepare import TEMPLATES
    from mllm.eval.answer import run as answer

    out_dir = Path(out_dir)
    prompt = TEMPLATES[("rec", style)][template]
    max_new_tokens = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[style]
    settings = {"model": str(model_dir), "weights": _weights_stamp(model_dir), "prompt": prompt,
                "square_pad": square_pad, "system_prompt": system_prompt, "max_new_tokens": max_new_tokens,
                "decoding": "greedy"}
    predictions, references, skipped, per_split = [], [], [], {}
    for rec_file in rec_files:
        rec_file = Path(rec_file)
        split = canonical_split(rec_file.stem)
        root = Path(image_root) if image_root is not None else rec_file.parent
        questions = out_dir / "questions" / f"{split}.jsonl"
        answers = out_dir / "answers" / f"{split}.jsonl"
        _check_settings(out_dir / "answers" / f"{split}.settings.json", settings)
        stats = write_questions(rec_file, split, questions, root, prompt, square_pad, out_dir / "padded_images",
                                limit, fraction)
        for message in stats["missing_images"] + stats["malformed"]:
            print(f"grounding: not asked: {message}", file=sys.stderr)
        full = limit is None and fraction is None
        if full and split in EXPECTED_SIZES and stats["lines_in_file"] != EXPECTED_SIZES[split]:
            print(f"grounding: warning: {rec_file} has {stats['lines_in_file']} lines, the published split "
                  f"{split} has {EXPECTED_SIZES[split]} (eval_facts §3.2)", file=sys.stderr)
        stats |= answer(str(model_dir), questions, answers, decoding="greedy", batch_size=batch_size,
                        max_new_tokens=max_new_tokens, system_prompt=system_prompt, quiet=quiet,
                        on_other_run="recompute", **(runtime or {}))
        p, r, s = read_answers(answers)
        predictions += p
        references += r
        skipped += [{**entry, "split": split} for entry in s]
        per_split[split] = {k: (len(v) if isinstance(v, list) else v) for k, v in stats.items()} | {
            "answers": str(answers), "missing_image_lines": stats["missing_images"][:20]}
    result = score(predictions, references, threshold=threshold, square_pad=square_pad)
    asked = {k: settings[k] for k in ("prompt", "system_prompt", "max_new_tokens")}
    result |= {"skipped": skipped, "model": str(model_dir), "inputs": per_split,
               "settings": result["settings"] | asked | {"style": style, "limit": limit, "fraction": fraction}}
    if draw:
        result["pictures"] = draw_samples(result, references, predictions, out_dir / "pictures", draw, seed)
    write_json_atomic(out_dir / "grounding.json", result)
    return result


def ground(model, tokenizer, processor, image, expression: str, style: str = "plain", square_pad: bool = False,
           template: int = 0, max_new_tokens: int = 64, system_prompt: str | None = None) -> dict:
    """{"answer", "grid_box" (or None), "pixel_box" (or None), "format"} for one expression in one PIL image."""
    from mllm.data.grounding_prepare import TEMPLATES, pad_image_to_square
    from mllm.model.generation import GenerationSettings, build_chat_prompt, generate

    shown = pad_image_to_square(image) if square_pad else image
    question = TEMPLATES[("rec", style)][template].format(expression=expression)
    text, images = build_chat_prompt([{"role": "user", "content": [shown, question]}], tokenizer,
                                     system_prompt=system_prompt, question_first=model.config.question_first)
    answer = generate(model, processor([text], [images]), tokenizer,
                      GenerationSettings(max_new_tokens=max_new_tokens))[0]
    parsed = parse_box(answer, GRID)
    if parsed is None:
        return {"answer": answer, "grid_box": None, "pixel_box": None, "format": None}
    grid_box, fmt = parsed
    pixel_box = grid_to_pixel(grid_box, image.width, image.height, GRID, square_pad)
    return {"answer": answer, "grid_box": grid_box, "pixel_box": [round(v, 1) for v in pixel_box], "format": fmt}
