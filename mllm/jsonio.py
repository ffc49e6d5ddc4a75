"""JSON files written atomically and JSON-lines files read with per-line error reports.

Every result file of the project goes through `write_json_atomic` (a temporary file renamed into place), so an
interrupted run never leaves a half-written result that looks complete. `read_jsonl` never stops at a bad line:
it returns the good records with their line numbers and one skip entry per malformed line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` into `path` through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1))


def read_jsonl(path: str | Path) -> tuple[list[tuple[int, Any]], list[dict]]:
    """((line number, record) pairs, skipped lines as {"line", "reason"}) of a JSON-lines file."""
    records, skipped = [], []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_no, json.loads(line)))
        except json.JSONDecodeError as err:
            skipped.append({"line": line_no, "reason": f"malformed JSON: {err.msg}"})
    return records, skipped


def read_json_records(path: str | Path, what: str = "records") -> list[dict]:
    """A JSON list of objects (the exercise's data files); ValueError naming the file and the bad record."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {what}, got {type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {i} is not an object")
    return records
