"""`mllm grounding prepare`: Shikra-format annotations -> grounding SFT conversations (the exercise's JSON).

    mllm grounding prepare --rec REC_refcoco_unc_train.jsonl [--rec ...] [--flickr CWB_flickr30k_train.jsonl] \\
        --image-root coco/train2014 --out grounding_train.json [--tasks rec,reg,gc] [--style plain|qwen] \\
        [--templates first|random] [--square-pad] [--mix sft_train.json --mix-ratio 0.2] [--seed 0]

Inputs (eval_facts §3.3):
- REC lines `{img_path, expression, bbox [x0,y0,x1,y1] pixels (x1, y1 exclusive), height, width, ...}`;
- Flickr30k-entities lines `{image_id, sentence with <ph_st>phrase<ph_ed>, boxes, boxes_seq}` (image
  `{image_id}.jpg`; its size is read from the file header).
Output: a JSON list of `{"id": "REC_i" | "REG_i" | "GC_i", "image", "conversations"}` whose image paths are
relative to the image root (what `mllm train sft --image_folder` expects), and `<out stem>.report.json`.

Tasks: REC asks for the box of an expression; REG gives a box and asks for the expression; GC (Flickr only)
asks for a caption whose phrases carry their boxes. Box styles: "plain" `[x0,y0,x1,y1]` (several boxes of one
phrase as Shikra's `[a,b,c,d;e,f,g,h]`) and "qwen" `<ref>phrase</ref><box>(x0,y0),(x1,y1)</box>`.

Coordinate frame (minicpmv_facts §9.4, eval_facts §5.9): integers on a 0..1000 grid (truncated). Default
(square_pad off): each axis is normalised by the unpadded image's own size, and the model's processor slices
the image as usual; this is what the course's base model is trained with. `--square-pad`: the exercise's
convention, where the image is centred on a white square of side max(w, h) (offsets (S-w)//2, (S-h)//2) and
both axes share that scale; the padded copies are written under `--padded-dir` and the records point there,
so what the model sees is the frame the numbers are measured in. Evaluate with the same choice.

Prompt templates: `--templates first` (default) always uses the first template of each task, which for REC
in the plain style is `GROUNDING_PROMPT`, the prompt the evaluation asks with; `random` draws one per record.

Checks, each counted in the report with the offending lines (never silently kept): a box with x1 <= x0 or
y1 <= y0 is "degenerate"; a box entirely outside the image is "outside"; a box overshooting the image by at
most 2 px (`CLIP_TOLERANCE`) is clipped and counted as "clipped"; a larger overshoot is "overshoot" and is
skipped (clipping it would change the object); a missing or unreadable image is "missing_image".
A GC sentence loses only the phrases whose boxes failed, but if every box failed the sentence is skipped.

Determinism: template draws, mix-in sampling and the final shuffle use `random.Random(f"grounding/{seed}")`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from mllm.data.boxes import format_box, pixel_to_grid
from mllm.data.formats import read_conversations

GRID = 1000  # the 0..1000 grid of the exercise and of Qwen-VL
CLIP_TOLERANCE = 2.0  # px: annotation tools round box edges outwards by a pixel or two; more is an error
EXAMPLES_KEPT = 20  # offending lines listed per problem kind in the report
PAD_FILL = (255, 255, 255)  # the exercise pads with white (facts §9.4)

GROUNDING_PROMPT = "Where is {expression} in image? answer in [x0,y0,x1,y1] format."

# The first template of each (task, style) is the default; `{expression}` / `{box}` are filled in.
TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("rec", "plain"): (
        GROUNDING_PROMPT,
        "Give the bounding box of {expression} as [x0,y0,x1,y1].",
        "Locate {expression} in the image and answer with its box [x0,y0,x1,y1].",
        "Which region shows {expression}? answer in [x0,y0,x1,y1] format.",
    ),
    ("rec", "qwen"): (
        "Where is <ref>{expression}</ref> in image? answer with <box>(x0,y0),(x1,y1)</box>.",
        "Give the bounding box of <ref>{expression}</ref>.",
        "Locate <ref>{expression}</ref> in the image.",
    ),
    ("reg", "plain"): (
        "What is the object in the region {box}? Answer with a short referring expression.",
        "Describe the region {box} of the image briefly.",
        "Give a short description of what is at {box}.",
    ),
    ("reg", "qwen"): (
        "What is the object in the region {box}? Answer with a short referring expression.",
        "Describe the region {box} of the image briefly.",
    ),
    ("gc", "plain"): (
        "Describe the image in one sentence and give each mentioned object's box as [x0,y0,x1,y1].",
        "Write a short caption; put the box [x0,y0,x1,y1] after each object you mention.",
    ),
    ("gc", "qwen"): (
        "Describe the image in one sentence and ground each mentioned object with <ref></ref><box></box>.",
        "Write a short grounded caption of the image.",
    ),
}
TASKS = ("rec", "reg", "gc")
STYLES = ("plain", "qwen")
PROBLEMS = ("malformed", "missing_image", "degenerate", "outside", "overshoot")


# ---- pure pieces -------------------------------------------------------------------------------------------------

def check_box(box: Sequence[float], width: int, height: int,
              tolerance: float = CLIP_TOLERANCE) -> tuple[list[float] | None, str]:
    """(box to use or None, verdict): "ok", "clipped" (overshoot <= tolerance px), or a skip reason:
    "degenerate" (x1 <= x0 or y1 <= y0), "outside" (no overlap with the image), "overshoot" (> tolerance)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None, "malformed"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, "malformed"  # NaN / Infinity (JSON readers accept both): no box to learn
    if x1 <= x0 or y1 <= y0:
        return None, "degenerate"
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return None, "outside"
    overshoot = max(-x0, -y0, x1 - width, y1 - height)
    if overshoot <= 0:
        return [x0, y0, x1, y1], "ok"
    if overshoot > tolerance:
        return None, "overshoot"
    return [max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))], "clipped"


def box_text(boxes: Sequence[Sequence[float]], width: int, height: int, style: str, square_pad: bool,
             ref: str | None = None) -> str:
    """Pixel boxes (one phrase) -> answer text on the grid: plain `[a,b,c,d]` / `[a,b,c,d;e,f,g,h]`, or
    qwen `<ref>ref</ref><box>(a,b),(c,d)</box><box>...</box>`."""
    grids = [pixel_to_grid(b, width, height, GRID, square_pad) for b in boxes]
    if style == "plain":
        return "[" + ";".join(format_box(g, "plain")[1:-1] for g in grids) + "]"
    if style == "qwen":
        head = f"<ref>{ref}</ref>" if ref is not None else ""
        return head + "".join(format_box(g, "qwen") for g in grids)
    raise ValueError(f"unknown box style {style!r} (expected one of {STYLES})")


_PHRASE = re.compile(r"<ph_st>(.*?)<ph_ed>")


def grounded_caption(sentence: str, phrase_boxes: list[list[list[float]] | None], width: int, height: int,
                     style: str, square_pad: bool) -> str:
    """Flickr sentence with `<ph_st>p<ph_ed>` -> caption with each phrase's boxes (None: the phrase stays plain)."""
    pieces, last = [], 0
    for n, match in enumerate(_PHRASE.finditer(sentence)):
        pieces.append(sentence[last:match.start()])
        phrase, boxes = match.group(1), phrase_boxes[n] if n < len(phrase_boxes) else None
        if not boxes:
            pieces.append(phrase)
        elif style == "plain":
            pieces.append(f"{phrase} {box_text(boxes, width, height, style, square_pad)}")
        else:
            pieces.append(box_text(boxes, width, height, style, square_pad, ref=phrase))
        last = match.end()
    pieces.append(sentence[last:])
    return "".join(pieces)


def pad_image_to_square(image, fill=PAD_FILL):
    """The image centred on a `fill` square of side max(w, h), at the offsets `pad_to_square_offsets` gives."""
    from PIL import Image

    from mllm.data.boxes import pad_to_square_offsets

    side, left, top = pad_to_square_offsets(*image.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image.convert("RGB"), (left, top))
    return canvas


def conversation(image: str, record_id: str, user: str, assistant: str) -> dict:
    return {"id": record_id, "image": image, "conversations": [
        {"role": "user", "content": "<image>\n" + user}, {"role": "assistant", "content": assistant}]}


def group_turns(records: list[dict], turns: int, rng: random.Random) -> list[dict]:
    """Join the single-turn records of each image into multi-turn conversations of at most `turns` questions
    (in a shuffled order; the image tag stays in the first question). A record keeps the id of its first
    question. One encoding of the image then trains several answers: more signal per step on a CPU."""
    if turns <= 1:
        return records
    by_image: dict[str, list[dict]] = {}
    for record in records:
        by_image.setdefault(record["image"], []).append(record)
    grouped = []
    for image, items in by_image.items():
        items = list(items)
        rng.shuffle(items)
        for start in range(0, len(items), turns):
            chunk = items[start:start + turns]
            messages = []
            for k, item in enumerate(chunk):
                user, assistant = item["conversations"]
                text = user["content"] if k == 0 else user["content"].removeprefix("<image>\n")
                messages += [{"role": "user", "content": text}, assistant]
            grouped.append({"id": chunk[0]["id"], "image": image, "conversations": messages})
    return grouped


# ---- report --------------------------------------------------------------------------------------------------------

@dataclass
class PrepareReport:
    """Counts and examples of everything read, written, clipped and skipped."""

    read: int = 0
    written: dict[str, int] = field(default_factory=dict)  # per task, plus "mix"
    clipped: int = 0
    size_mismatch: int = 0  # width/height in the line differ from the image's: the image's own size is used
    skipped: dict[str, int] = field(default_factory=lambda: {k: 0 for k in PROBLEMS})
    examples: dict[str, list[str]] = field(default_factory=dict)

    def note(self, kind: str, where: str, detail: str = "") -> None:
        if kind == "clipped":
            self.clipped += 1
        elif kind == "size_mismatch":
            self.size_mismatch += 1
        else:
            self.skipped[kind] += 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(f"{where}: {detail}" if detail else where)

    def count(self, task: str) -> None:
        self.written[task] = self.written.get(task, 0) + 1

    def as_dict(self) -> dict:
        return {"read": self.read, "written": dict(self.written), "total_written": sum(self.written.values()),
                "clipped": self.clipped, "size_mismatch": self.size_mismatch, "skipped": dict(self.skipped),
                "examples": self.examples}

    def summary(self) -> str:
        written = ", ".join(f"{k} {v}" for k, v in self.written.items()) or "nothing"
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.items() if v) or "none"
        return (f"grounding prepare: {self.read} annotation lines read; written: {written}; "
                f"clipped boxes (<= {CLIP_TOLERANCE:g} px): {self.clipped}; "
                + (f"lines whose width/height differ from the image (its real size used): {self.size_mismatch}; "
                   if self.size_mismatch else "") + f"skipped: {skipped}")


# ---- builder -------------------------------------------------------------------------------------------------------

@dataclass
class PrepareOptions:
    tasks: tuple[str, ...] = ("rec",)
    style: str = "plain"
    templates: str = "first"  # or "random"
    square_pad: bool = False
    padded_dir: Path | None = None  # where padded copies go (square_pad only)
    per_image: int | None = None  # at most this many REC/REG lines per image
    turns_per_image: int = 1  # >1: questions about one image joined into multi-turn conversations
    seed: int = 0

    def __post_init__(self):
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r} (expected some of {TASKS})")
        if self.style not in STYLES:
            raise ValueError(f"unknown box style {self.style!r} (expected one of {STYLES})")
        if self.templates not in ("first", "random"):
            raise ValueError(f"templates must be 'first' or 'random', not {self.templates!r}")


class GroundingBuilder:
    """Turns annotation lines into conversations under one set of options, counting every problem."""

    def __init__(self, options: PrepareOptions, image_root: Path):
        self.options = options
        self.image_root = Path(image_root)
        self.rng = random.Random(f"grounding/{options.seed}")
        self.report = PrepareReport()
        self.records: list[dict] = []
        self.lines_seen = 0  # running line number across REC files: REC_i / REG_i ids
        self.sizes: dict[str, tuple[int, int] | None] = {}

    def template(self, task: str) -> str:
        choices = TEMPLATES[(task, self.options.style)]
        return choices[0] if self.options.templates == "first" else self.rng.choice(choices)

    def image_size(self, relative: str) -> tuple[int, int] | None:
        """(width, height) from the header, or None if the file is missing or unreadable (cached)."""
        if relative not in self.sizes:
            from PIL import Image

            try:
                with Image.open(self.image_root / relative) as image:
                    self.sizes[relative] = image.size
            except (OSError, ValueError):
                self.sizes[relative] = None
        return self.sizes[relative]

    def image_for_record(self, relative: str) -> str:
        """Path the record names: the original, or (square_pad) a padded copy written once."""
        if not self.options.square_pad:
            return relative
        padded_dir = self.options.padded_dir or self.image_root / "padded_square"
        target = Path(padded_dir) / relative
        if not target.is_file():
            from PIL import Image

            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(self.image_root / relative) as image:
                pad_image_to_square(image).save(target)
        return os.path.relpath(target, self.image_root)

    def add_rec_line(self, rec: dict, where: str, per_image_seen: dict[str, int]) -> None:
        index = self.lines_seen
        self.lines_seen += 1
        missing = [k for k in ("img_path", "expression", "bbox") if k not in rec]
        if missing or len(rec.get("bbox") or []) != 4:
            self.report.note("malformed", where, f"missing {missing}" if missing else "bbox needs 4 numbers")
            return
        path = rec["img_path"]
        per_image_seen[path] = per_image_seen.get(path, 0) + 1
        if self.options.per_image is not None and per_image_seen[path] > self.options.per_image:
            return
        size = self.image_size(path)
        if size is None:
            self.report.note("missing_image", where, str(self.image_root / path))
            return
        width, height = size  # the image's real size: the one boxes are measured in when the model sees it
        stated = (rec.get("width"), rec.get("height"))
        if stated != (None, None) and stated != (width, height):
            self.report.note("size_mismatch", where, f"line says {stated[0]}x{stated[1]}, the image is "
                                                      f"{width}x{height}; using the image's size")
            print(f"warning: {where}: width/height {stated[0]}x{stated[1]} differ from the image's real size "
                  f"{width}x{height}; the real size is used", file=sys.stderr)
        box, verdict = check_box(rec["bbox"], width, height)
        if box is None:
            self.report.note(verdict, where, f"bbox {rec['bbox']} in a {width}x{height} image")
            return
        if verdict == "clipped":
            self.report.note("clipped", where, f"bbox {rec['bbox']} -> {box}")
        image = self.image_for_record(path)
        expression, style, pad = rec["expression"], self.options.style, self.options.square_pad
        if "rec" in self.options.tasks:
            answer = box_text([box], width, height, style, pad, ref=expression if style == "qwen" else None)
            prompt = self.template("rec").format(expression=expression)
            self.records.append(conversation(image, f"REC_{index}", prompt, answer))
            self.report.count("rec")
        if "reg" in self.options.tasks:
            prompt = self.template("reg").format(box=box_text([box], width, height, style, pad))
            self.records.append(conversation(image, f"REG_{index}", prompt, expression))
            self.report.count("reg")

    def add_rec_file(self, path: Path) -> None:
        seen: dict[str, int] = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            self.report.read += 1
            where = f"{path}:{number}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                self.lines_seen += 1
                self.report.note("malformed", where, f"not valid JSON ({err.msg})")
                continue
            self.add_rec_line(rec if isinstance(rec, dict) else {}, where, seen)

    def add_flickr_file(self, path: Path) -> None:
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            self.report.read += 1
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
                sentence, boxes, seq = item["sentence"], item["boxes"], item["boxes_seq"]
                relative = item.get("img_path") or f"{item['image_id']}.jpg"
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                self.report.note("malformed", where, f"{type(err).__name__}: {err}")
                continue
            size = self.image_size(relative)
            if size is None:
                self.report.note("missing_image", where, str(self.image_root / relative))
                continue
            width, height = size
            phrase_boxes, any_kept = [], False
            for ids in seq:
                kept = []
                for i in ids:
                    box, verdict = check_box(boxes[i], width, height)
                    if box is None:
                        self.report.note(verdict, where, f"box {i} {boxes[i]} in a {width}x{height} image")
                        continue
                    if verdict == "clipped":
                        self.report.note("clipped", where, f"box {i} {boxes[i]} -> {box}")
                    kept.append(box)
                phrase_boxes.append(kept or None)
                any_kept |= bool(kept)
            if not any_kept:
                continue
            caption = grounded_caption(sentence, phrase_boxes, width, height, self.options.style,
                                       self.options.square_pad)
            self.records.append(conversation(self.image_for_record(relative), f"GC_{len(self.records)}",
                                             self.template("gc"), caption))
            self.report.count("gc")

    def mix_in(self, general: list[dict], ratio: float) -> None:
        """Add general SFT records so that they make up `ratio` of the result (sampled without replacement;
        all of them, reported, if there are too few)."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mix ratio must be in [0, 1), got {ratio}")
        wanted = round(len(self.records) * ratio / (1.0 - ratio))
        picked = self.rng.sample(general, min(wanted, len(general)))
        if wanted > len(general):
            print(f"grounding prepare: only {len(general)} mix-in records for the {wanted} wanted", file=sys.stderr)
        self.records += picked
        self.report.written["mix"] = len(picked)

    def shuffled(self) -> list[dict]:
        records = list(self.records)
        self.rng.shuffle(records)
        return records


def report_path(out: Path) -> Path:
    return out.with_name(out.stem + ".report.json")


def prepare(out: Path, rec_files: Iterable[Path] = (), flickr_files: Iterable[Path] = (),
            image_root: Path | None = None, options: PrepareOptions | None = None, mix: Path | None = None,
            mix_ratio: float = 0.0, shuffle: bool = True, quiet: bool = False) -> dict:
    """Write the conversations to `out` and the report next to it; return the report dict.

    `image_root` defaults to the folder of the first annotation file."""
    options = options or PrepareOptions()
    rec_files, flickr_files = [Path(p) for p in rec_files], [Path(p) for p in flickr_files]
    if not rec_files and not flickr_files:
        raise ValueError("give at least one REC or Flickr30k annotation file")
    if "gc" in options.tasks and not flickr_files:
        raise ValueError("the gc task needs Flickr30k-entities files (--flickr)")
    root = Path(image_root) if image_root is not None else (rec_files or flickr_files)[0].parent
    builder = GroundingBuilder(options, root)
    if {"rec", "reg"} & set(options.tasks):
        for path in rec_files:
            builder.add_rec_file(path)
    if "gc" in options.tasks:
        for path in flickr_files:
            builder.add_flickr_file(path)
    builder.records = group_turns(builder.records, options.turns_per_image, builder.rng)
    if mix is not None and mix_ratio > 0:
        # any SFT format (llava, sharegpt, datasets...) mixes in, written out in the project's own records
        builder.mix_in(read_conversations(mix, image_cache=Path(out).parent / "data_images")[0], mix_ratio)
    records = builder.shuffled() if shuffle else builder.records
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, ensure_ascii=False))
    report = builder.report.as_dict() | {
        "records": len(records), "out": str(out), "image_root": str(root), "rec_files": [str(p) for p in rec_files],
        "flickr_files": [str(p) for p in flickr_files], "mix": str(mix) if mix else None, "mix_ratio": mix_ratio,
        "options": {"tasks": list(options.tasks), "style": options.style, "templates": options.templates,
                    "square_pad": options.square_pad, "per_image": options.per_image,
                    "turns_per_image": options.turns_per_image, "seed": options.seed,
                    "grid": GRID, "clip_tolerance_px": CLIP_TOLERANCE}}
    report_path(out).write_text(json.dumps(report, indent=1, ensure_ascii=False))
    if not quiet:
        print(builder.report.summary())
        print(f"wrote {len(records)} records to {out} (report: {report_path(out)})")
    return report


def rec_conversations(rec_jsonl: Path, per_image: int | None = None) -> list[dict]:
    """Shikra REC lines -> REC records (ids REC_<line index>) in file order, with `GROUNDING_PROMPT` and the
    plain box on the 0-1000 grid of the unpadded image; images are relative to the file's folder.
    Problems are counted and printed (one line), never kept."""
    builder = GroundingBuilder(PrepareOptions(per_image=per_image), Path(rec_jsonl).parent)
    builder.add_rec_file(Path(rec_jsonl))
    if sum(builder.report.skipped.values()) or builder.report.clipped:
        print(builder.report.summary(), file=sys.stderr)
    return builder.records
