"""`mllm answer`: answer every question of a jsonl file (the exercise's `eval.sh` / `model_eval.py`).

Input lines follow Object HalBench: `image` (base64 when longer than 1000 characters, else a path relative to
the question file's folder or `--image-root`), `question`, optional `image_id`; every other key is kept in
`metainfos`. Output lines carry the exercise's fields: `idx, question, answer, model, metainfos, image_id`,
plus `qid` (which question this answers) and `run` (what produced it).

Safe to rerun, and never destructive:
- Resumable: answers are appended and flushed batch by batch; a rerun skips the questions already answered.
  Questions are matched by a stable key (`qid`: the record's `id` or `question_id`, else a hash of the record,
  numbered by occurrence), so editing the question file between runs never misattributes an answer.
- Every answer line records its run's fingerprint (model folder and its weight files, decoding, token limits,
  system prompt, sampling seed). Appending to a file of another run, or to a file that is not an answers
  file at all (the question file itself, any other JSON), is refused; `overwrite=True` starts it afresh.
- Only a torn LAST line (a write cut by a kill) is cut off; a bad line anywhere else is an error naming
  file:line, and nothing is changed.
- The output is locked (`fcntl.flock`) for the whole run: a second process on the same file fails at once.
- A malformed question line, or a record whose image cannot be read or prepared (wrong field type, missing
  file, corrupt data, a decompression bomb), is reported with file:line and skipped; the rest is answered.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

KEPT_OUT_OF_METAINFOS = ("image", "question")
ANSWER_FIELDS = ("idx", "question", "answer", "qid", "run")


class AnswersFileError(ValueError):
    """The output file cannot be appended to: it belongs to another run, is not an answers file, or is busy."""


class OtherRunError(AnswersFileError):
    """The output file holds answers of another run (another model, weights or decoding setting)."""


def question_key(record: dict) -> str:
    """A question's stable identity: its `id` / `question_id`, else a hash of the whole record."""
    for field in ("id", "question_id"):
        if isinstance(record.get(field), (str, int)) and not isinstance(record.get(field), bool):
            return f"{field}:{record[field]}"
    digest = hashlib.sha1(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"sha1:{digest[:16]}"


def conversation_questions(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(record number, question record, None) -- or (record number, None, what is wrong) -- of each record of a JSON
    list in the exercise's test.json / SFT format: the first user turn
    (without its `<image>` marker) is the question, the assistant turn after it the target; the image, the id and
    the category (or the image's folder) are kept, so `mllm eval yesno` can score the answers alone."""
    items = json.loads(path.read_text())
    if not isinstance(items, list):
        raise AnswersFileError(f"{path}: a JSON question file holds a list of records (the exercise's test.json "
                               f"format), not a {type(items).__name__}")
    out = []
    for number, item in enumerate(items, start=1):
        turns = item.get("conversations") if isinstance(item, dict) else None
        user = next((t for t in turns or [] if isinstance(t, dict) and t.get("role") == "user"), None)
        if user is None or "image" not in item:
            out.append((number, None, f"{path}: record {number}: expected image and conversations with a user turn "
                                      f"(keys: {sorted(item) if isinstance(item, dict) else item!r})"))
            continue
        after = turns[turns.index(user) + 1:]
        target = next((t.get("content") for t in after if isinstance(t, dict) and t.get("role") == "assistant"), None)
        image = item["image"] if isinstance(item["image"], str) else next(iter(item["image"].values()), None)
        record = {"image": image, "question": str(user.get("content", "")).replace("<image>", "").strip()}
        if "id" in item:
            record["id"] = item["id"]
        if target is not None:
            record["target"] = target
        category = item.get("category") or Path(image or "").parent.name
        if category:
            record["category"] = category
        out.append((number, record, None))
    return out


def jsonl_questions(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """The same triples for a JSON-lines question file: one {image, question, ...} object per line."""
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                out.append((number, None, f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start})"))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                out.append((number, None, f"{path}:{number}: not valid JSON ({err.msg})"))
                continue
            missing = [k for k in ("image", "question") if not isinstance(record, dict) or k not in record]
            if missing:
                out.append((number, None, f"{path}:{number}: missing field(s) {missing}"))
                continue
            out.append((number, record, None))
    return out


def read_questions(path: Path) -> tuple[list[dict], list[str]]:
    """Records (with `idx` = line number - 1, or record number - 1 in a JSON list, and a unique `qid`) and one
    message per malformed line. A JSON-lines file holds one question per line ({image, question, ...}); a file
    whose text starts with `[` is the exercise's test.json / SFT format (`conversation_questions`)."""
    records, problems, seen = [], [], {}
    is_list = path.read_bytes()[:4096].lstrip().startswith(b"[")
    for number, record, problem in (conversation_questions(path) if is_list else jsonl_questions(path)):
        if problem is not None:
            problems.append(problem)
            continue
        key = question_key(record)
        seen[key] = seen.get(key, 0) + 1
        qid = key if seen[key] == 1 else f"{key}#{seen[key]}"  # identical records: one answer each
        records.append({"idx": number - 1, "record": record, "line": number, "qid": qid})
    return records, problems


def run_fingerprint(model_dir: str, decoding: str, max_new_tokens: int, min_new_tokens: int,
                    system_prompt: str | None, seed: int | None, dtype: str = "float32",
                    adapter: str | None = None) -> dict:
    """What makes two answers comparable: the model (folder and weight files, adapter) and every decoding setting."""
    from mllm.model.checkpoint import adapter_fingerprint, model_fingerprint, resolve_model_dir

    folder = resolve_model_dir(model_dir).resolve()
    run = {"model": str(folder), "weights": model_fingerprint(folder)[:16], "decoding": decoding,
           "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "system_prompt": system_prompt,
           "seed": seed if decoding == "sample" else None, "dtype": dtype}
    if adapter is not None:  # only then: answers of runs without an adapter keep their fingerprint
        run["adapter"] = adapter_fingerprint(adapter)[:16]
    return run


def read_answers(path: Path, fingerprint: dict | None = None) -> tuple[set[str], int]:
    """(qids answered, byte length of the complete lines) of an answers file.

    Raises AnswersFileError naming file:line for a line that is not an answer of this run; only a torn last
    line (no newline at its end) is tolerated, and reported through the byte length.
    """
    data = path.read_bytes() if path.exists() else b""
    done, start, number = set(), 0, 0
    while start < len(data):
        number += 1
        end = data.find(b"\n", start)
        if end < 0:
            return done, start  # no newline: the last write did not finish; the caller cuts it
        try:
            row = json.loads(data[start:end])
            missing = [k for k in ANSWER_FIELDS if not isinstance(row, dict) or k not in row]
        except (json.JSONDecodeError, UnicodeDecodeError):
            row, missing = None, ["(not JSON)"]
        if missing:
            raise AnswersFileError(
                f"{path}:{number}: not an answer line written by `mllm answer` (missing {missing}); refusing to "
                "append to it. Choose another --out, or pass --overwrite to replace the file")
        if fingerprint is not None and row["run"] != fingerprint:
            changed = sorted(k for k in fingerprint if row["run"].get(k) != fingerprint[k]) \
                if isinstance(row["run"], dict) else ["run"]
            raise OtherRunError(
                f"{path}:{number}: answers of another run (different {', '.join(changed)}); refusing to mix two "
                "runs' answers. Choose another --out, or pass --overwrite to start the file afresh")
        done.add(row["qid"])
        start = end + 1
    return done, len(data)


def read_done(path: Path) -> set[str]:
    """qids of every complete answer line; a torn last line (from a killed run) is cut off the file."""
    done, good_end = read_answers(path)
    if path.exists() and good_end < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


def open_image(value, base: Path, image_root: Path | None, where: str):
    """The record's `image` (a base64 string or a path) as RGB; ValueError naming file:line otherwise."""
    from mllm.model.image_processing import load_image

    if not isinstance(value, str):
        raise ValueError(f"{where}: field 'image' must be a string (a path or base64 data), "
                         f"got {type(value).__name__}")
    if len(value) > 1000:
        try:
            return load_image(value.strip())  # base64 goes through the same size and decode guards as files
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from err
    for root in (image_root, base):
        if root is not None and (root / value).is_file():
            return _guarded(str(root / value), where)
    if value and Path(value).is_file():
        return _guarded(value, where)
    raise ValueError(f"{where}: image file {value!r} not found (looked under {image_root or base})")


def _guarded(path: str, where: str):
    from mllm.model.image_processing import load_image

    try:
        return load_image(path)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def answer_record(item: dict, answer: str, model_name: str, fingerprint: dict) -> dict:
    record = item["record"]
    out = {"idx": item["idx"], "question": record["question"], "answer": answer, "model": model_name,
           "metainfos": {k: v for k, v in record.items() if k not in KEPT_OUT_OF_METAINFOS}}
    if "image_id" in record:
        out["image_id"] = record["image_id"]
    out["qid"] = item["qid"]
    out["run"] = fingerprint
    return out


def lock_output(out: Path, overwrite: bool):
    """Open `out` for appending under an exclusive lock (kept until the returned file is closed)."""
    if out.is_dir():
        raise AnswersFileError(f"--out {out} is a directory; give a file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    sink = open(out, "ab")
    try:
        fcntl.flock(sink.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sink.close()
        raise AnswersFileError(f"{out} is being written by another process (locked); wait for it or choose "
                               "another --out") from None
    if overwrite:
        sink.truncate(0)
    return sink


def run(model_dir: str, questions: Path, out: Path, decoding: str = "greedy", batch_size: int = 8,
        max_new_tokens: int = 512, min_new_tokens: int = 0, image_root: Path | None = None,
        system_prompt: str | None = None, limit: int | None = None, quiet: bool = False, seed: int = 0,
        overwrite: bool = False, on_other_run: str = "error", device: str = "cpu", dtype: str = "float32",
        attn: str = "sdpa", adapter: str | None = None) -> dict:
    """Answer the pending questions of `questions` into `out` (see the module docstring for the rules), with
    the model on `device` in `dtype` (a name: float32, bfloat16, float16), with `attn` attention and, when given,
    the PEFT `adapter` merged in.

    on_other_run: "error" (the CLI) refuses a file of another run; "recompute" (a pipeline answering into
    its own folder, e.g. the course after retraining a model) starts such a file afresh."""
    from mllm.model.generation import GenerationSettings, build_chat_prompt, generate
    from mllm.model.loading import DTYPES, load_pretrained

    questions, out = Path(questions), Path(out)
    if out.exists() and questions.exists() and os.path.samefile(out, questions):
        raise AnswersFileError(f"--out {out} is the question file itself; choose another output file")
    items, problems = read_questions(questions)
    for message in problems:
        print(f"skipped {message}", file=sys.stderr)
    if limit is not None:
        items = items[:limit]
    fingerprint = run_fingerprint(model_dir, decoding, max_new_tokens, min_new_tokens, system_prompt, seed, dtype,
                                  adapter)
    stats = {"questions": len(items), "already_answered": 0, "answered": 0, "skipped_lines": len(problems),
             "skipped_records": 0, "skipped": []}
    with lock_output(out, overwrite) as sink:
        try:
            done, good_end = read_answers(out, fingerprint)  # raises before anything is changed
        except OtherRunError as err:
            if on_other_run != "recompute":
                raise
            print(f"{err.args[0].split(';')[0]}: answering afresh", file=sys.stderr)
            sink.truncate(0)
            done, good_end = set(), 0
        if good_end < out.stat().st_size:
            sink.truncate(good_end)  # only ever a torn last line
        pending = [it for it in items if it["qid"] not in done]
        stats["already_answered"] = len(items) - len(pending)
        if not pending:
            return stats
        model, tokenizer, processor = load_pretrained(model_dir, dtype=DTYPES[dtype], device=device,
                                                      attn_implementation=attn, adapter=adapter)
        settings = GenerationSettings(decoding=decoding, max_new_tokens=max_new_tokens,
                                      min_new_tokens=min_new_tokens)
        bar = tqdm(total=len(items), initial=stats["already_answered"], desc="answering", unit="q", disable=quiet)
        for start in range(0, len(pending), batch_size):
            batch, texts, images = [], [], []
            for item in pending[start: start + batch_size]:
                where = f"{questions}:{item['line']}"
                try:  # any failure of one record skips that record only
                    image = open_image(item["record"]["image"], questions.parent, image_root, where)
                    msgs = [{"role": "user", "content": [image, str(item["record"]["question"])]}]
                    text, ordered = build_chat_prompt(msgs, tokenizer, system_prompt=system_prompt,
                                                      question_first=model.config.question_first)
                except Exception as err:  # noqa: BLE001 - reported with its line, the run goes on
                    reason = str(err) if str(err).startswith(where) else f"{where}: {type(err).__name__}: {err}"
                    print(f"skipped {reason}", file=sys.stderr)
                    stats["skipped_records"] += 1
                    stats["skipped"].append({"line": item["line"], "reason": reason})
                    bar.update(1)
                    continue
                batch.append(item)
                texts.append(text)
                images.append(ordered)
            if not batch:
                continue
            answers = generate(model, processor(texts, images), tokenizer, settings)
            lines = "".join(json.dumps(answer_record(it, a, model_dir, fingerprint), ensure_ascii=False) + "\n"
                            for it, a in zip(batch, answers))
            sink.write(lines.encode("utf-8"))
            sink.flush()
            os.fsync(sink.fileno())
            stats["answered"] += len(batch)
            bar.update(len(batch))
        bar.close()
    return stats
