"""`mllm answer`: answer every question of a jsonl file (the exercise's `eval.sh` / `model_eval.py`).

Input lines follow Object HalBench: `image` (base64 when longer than 1000 characters, else a path relative to
the question file's folder or `--image-root`), `question`, optional `image_id`; every other key is kept in
`metainfos`. Output lines carry the exercise's fields: `idx, question, answer, model, metainfos, image_id`.

Resumable: answers are appended and flushed batch by batch; a rerun skips the questions already answered
and first cuts off a half-written last line, so a killed run loses at most the line it was writing.
A malformed input line is reported with its line number and skipped; the rest is answered.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

KEPT_OUT_OF_METAINFOS = ("image", "question")


def read_questions(path: Path) -> tuple[list[dict], list[str]]:
    """Records (with their `idx` = line number - 1) and one message per malformed line."""
    records, problems = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{path}:{number}: not valid JSON ({err.msg})")
                continue
            missing = [k for k in ("image", "question") if not isinstance(record, dict) or k not in record]
            if missing:
                problems.append(f"{path}:{number}: missing field(s) {missing}")
                continue
            records.append({"idx": number - 1, "record": record, "line": number})
    return records, problems


def read_done(path: Path) -> set[int]:
    """idx of every complete answer line; a torn last line (from a killed run) is cut off the file."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    done, good_end, start = set(), 0, 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            break  # no newline: the last write did not finish
        try:
            done.add(int(json.loads(data[start:end])["idx"]))
            good_end = end + 1
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            break
        start = end + 1
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


def open_image(value: str, base: Path, image_root: Path | None, where: str):
    from PIL import Image

    from mllm.model.image_processing import load_image

    if len(value) > 1000:
        try:
            return load_image(Image.open(io.BytesIO(base64.b64decode(value, validate=False))))
        except (binascii.Error, OSError) as err:
            raise ValueError(f"{where}: image is not valid base64 image data ({err})") from err
    for root in (image_root, base):
        if root is not None and (root / value).is_file():
            return load_image(str(root / value))
    if Path(value).is_file():
        return load_image(value)
    raise ValueError(f"{where}: image file {value!r} not found (looked under {image_root or base})")


def answer_record(item: dict, answer: str, model_name: str) -> dict:
    record = item["record"]
    out = {"idx": item["idx"], "question": record["question"], "answer": answer, "model": model_name,
           "metainfos": {k: v for k, v in record.items() if k not in KEPT_OUT_OF_METAINFOS}}
    if "image_id" in record:
        out["image_id"] = record["image_id"]
    return out


def run(model_dir: str, questions: Path, out: Path, decoding: str = "greedy", batch_size: int = 8,
        max_new_tokens: int = 512, min_new_tokens: int = 0, image_root: Path | None = None,
        system_prompt: str | None = None, limit: int | None = None, quiet: bool = False) -> dict:
    from mllm.model.generation import GenerationSettings, build_chat_prompt, generate
    from mllm.model.loading import load_pretrained

    items, problems = read_questions(questions)
    for message in problems:
        print(f"skipped {message}", file=sys.stderr)
    if limit is not None:
        items = items[:limit]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    pending = [it for it in items if it["idx"] not in done]
    stats = {"questions": len(items), "already_answered": len(items) - len(pending), "answered": 0,
             "skipped_lines": len(problems), "skipped_images": 0}
    if not pending:
        return stats
    model, tokenizer, processor = load_pretrained(model_dir)
    settings = GenerationSettings(decoding=decoding, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
    bar = tqdm(total=len(items), initial=stats["already_answered"], desc="answering", unit="q", disable=quiet)
    with open(out, "a", encoding="utf-8") as sink:
        for start in range(0, len(pending), batch_size):
            batch, texts, images = [], [], []
            for item in pending[start : start + batch_size]:
                where = f"{questions}:{item['line']}"
                try:
                    image = open_image(item["record"]["image"], questions.parent, image_root, where)
                except ValueError as err:
                    print(f"skipped {err}", file=sys.stderr)
                    stats["skipped_images"] += 1
                    bar.update(1)
                    continue
                msgs = [{"role": "user", "content": [image, str(item["record"]["question"])]}]
                text, ordered = build_chat_prompt(msgs, tokenizer, system_prompt=system_prompt)
                batch.append(item)
                texts.append(text)
                images.append(ordered)
            if not batch:
                continue
            answers = generate(model, processor(texts, images), tokenizer, settings)
            lines = "".join(json.dumps(answer_record(it, a, model_dir), ensure_ascii=False) + "\n"
                            for it, a in zip(batch, answers))
            sink.write(lines)
            sink.flush()
            os.fsync(sink.fileno())
            stats["answered"] += len(batch)
            bar.update(len(batch))
    bar.close()
    return stats
