"""`mllm logp`: the reference model's log-probs of every preference pair, computed ONCE and cached as JSON lines.

    mllm logp --model DIR --data_path world/preference_train.json [--image_folder world] [--ref_name ref]
              [--batch_size 8] [--on_stale error|recompute] [--device cpu|cuda] [--dtype float32]

Cache file: `{data folder}/{data stem}.{ref_name}.logp.jsonl` (never pickle). Line 1 is a header

    {"format": "mllm-logp-1", "model_fingerprint": ..., "data_sha256": ..., "sum_or_avg": "both",
     "settings": {"dtype", "max_slice_nums", "model_max_length"}, "pairs": N, "model_dir": ..., "data_path": ...}

then one line per pair: {"idx", "chosen_logp", "chosen_avg_logp", "chosen_per_token_logp", "rejected_logp", ...}
with the sum, the token mean and the per-token values (target positions only, in order) of each answer,
computed with `token_logps` under the pre-shifted label convention (the same code path the trainer uses).

- Fingerprint: sha256 over config.json, the tokenizer / chat-template files and every safetensors file's name,
  size, first and last MiB (whole file when smaller); fast on an 8B checkpoint. A change hidden in the middle of
  a large shard escapes it; the trainer's step-0 check (policy log-probs == cached ones) catches that.
- Staleness: a cache whose fingerprint, data hash or settings differ is refused with a message naming what
  changed (`on_stale="error"`, the CLI default) or deleted and recomputed (`on_stale="recompute"`).
- Resumable: every batch is appended, flushed and fsynced; a rerun keeps the lines already written, cuts a torn
  last line (a killed run), and computes only the missing pairs.
- Never destructive: a file that is not a cache (the data file itself, any other JSON) or a cache damaged before
  its last line is refused with file:line (`NotACacheError`), and reading a cache never changes it.
- One process (rank 0 work before `torchrun`); images are referenced by path, so replacing image files in place
  is not detected (the step-0 check is).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mllm.model.checkpoint import FINGERPRINT_CHUNK, model_fingerprint

FORMAT = "mllm-logp-1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StaleCacheError(ValueError):
    """The cache was computed for another model, data file or setting."""


def cache_path(data_path: str | os.PathLike, ref_name: str = "ref") -> Path:
    data_path = Path(data_path)
    return data_path.with_name(f"{data_path.name.removesuffix('.json')}.{ref_name}.logp.jsonl")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (a datasets folder): their relative names and contents."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(f"{file.relative_to(path)}\0".encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(FINGERPRINT_CHUNK), b""):
                digest.update(block)
    return digest.hexdigest()


def expected_header(model_dir, data_path, settings: dict, pairs: int | None = None) -> dict:
    return {"format": FORMAT, "model_fingerprint": model_fingerprint(model_dir), "data_sha256": file_sha256(data_path),
            "sum_or_avg": "both", "settings": settings, "pairs": pairs, "model_dir": str(model_dir),
            "data_path": str(data_path)}


def header_mismatches(found: dict, expected: dict) -> list[str]:
    """What differs between a cache header and the header the current model / data / settings would give."""
    problems = []
    if found.get("format") != FORMAT:
        problems.append(f"format {found.get('format')!r} != {FORMAT!r}")
    if found.get("model_fingerprint") != expected["model_fingerprint"]:
        problems.append(f"model fingerprint differs (cache: model {found.get('model_dir')!r}, "
                        f"{str(found.get('model_fingerprint'))[:12]}; now: {expected['model_dir']!r}, "
                        f"{expected['model_fingerprint'][:12]})")
    if found.get("data_sha256") != expected["data_sha256"]:
        problems.append(f"data file differs (sha256 {str(found.get('data_sha256'))[:12]} in the cache, "
                        f"{expected['data_sha256'][:12]} now)")
    for key, value in expected["settings"].items():
        if (found.get("settings") or {}).get(key) != value:
            problems.append(f"setting {key}: {(found.get('settings') or {}).get(key)!r} in the cache, {value!r} now")
    return problems


class NotACacheError(ValueError):
    """The file is not a log-probs cache (or is damaged before its last line): it is never written to."""


def read_cache(path: Path) -> tuple[dict | None, dict[str, dict], int]:
    """(header or None, pair key -> entry, byte length of the complete lines) of a cache file; nothing is
    changed. Only a torn last line (no newline: a killed run) is tolerated; anything else that is not a cache
    line raises NotACacheError naming file:line."""
    from mllm.data.preference_dataset import pair_key

    if not path.is_file():
        if path.exists():
            raise NotACacheError(f"{path} is not a file")
        return None, {}, 0
    data = path.read_bytes()
    header, entries, start, number = None, {}, 0, 0
    while start < len(data):
        number += 1
        end = data.find(b"\n", start)
        if end < 0:
            break  # the last write did not finish
        try:
            row = json.loads(data[start:end])
            if header is None:
                if not isinstance(row, dict) or row.get("format") != FORMAT:
                    raise ValueError("no header")
                header = row
            else:
                entries[pair_key(row["idx"])] = row
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
            what = "not a log-probs cache (no mllm-logp header)" if header is None else "not a cache line"
            raise NotACacheError(f"{path}:{number}: {what}; refusing to write to it. Choose another --out "
                                 "(or delete the file yourself)") from None
        start = end + 1
    return header, entries, start


def load_reference_logps(path: str | os.PathLike, model_dir=None, data_path=None, settings: dict | None = None,
                         ) -> tuple[dict, dict[str, dict]]:
    """(header, pair key -> entry) of a finished cache; with model_dir / data_path / settings, refuses (with
    `StaleCacheError`) a cache computed for anything else."""
    path = Path(path)
    header, entries, _ = read_cache(path)
    if header is None:
        raise FileNotFoundError(f"{path}: no reference log-probs; compute them first with `mllm logp`")
    if model_dir is not None and data_path is not None:
        problems = header_mismatches(header, expected_header(model_dir, data_path, settings or header["settings"]))
        if problems:
            raise StaleCacheError(f"{path} is stale: " + "; ".join(problems) +
                                  ". Recompute it: `mllm logp ... --on_stale recompute`")
    if header.get("pairs") is not None and len(entries) < header["pairs"]:
        raise ValueError(f"{path}: only {len(entries)} of {header['pairs']} pairs computed; rerun `mllm logp` "
                         "to finish it (it resumes)")
    return header, entries


def pair_logps(logits: torch.Tensor, labels: torch.Tensor, idx: list) -> list[dict]:
    """Cache entries of a concatenated batch (rows [0, B) chosen, [B, 2B) rejected)."""
    from mllm.train.losses import IGNORE_INDEX, token_logps

    per_token, total, avg = token_logps(logits, labels)  # (2B, L), (2B,), (2B,)
    pairs = len(idx)
    rows = []
    for i, key in enumerate(idx):
        row = {"idx": key}
        for side, r in (("chosen", i), ("rejected", pairs + i)):
            row[f"{side}_logp"] = float(total[r])
            row[f"{side}_avg_logp"] = float(avg[r])
            row[f"{side}_per_token_logp"] = per_token[r][labels[r] != IGNORE_INDEX].tolist()
        rows.append(row)
    return rows


def compute_reference_logps(model_dir: str | os.PathLike, data_path: str | os.PathLike, image_folder=".",
                            ref_name: str = "ref", batch_size: int = 8, out: str | os.PathLike | None = None,
                            max_slice_nums: int | None = None, model_max_length: int | None = 2048,
                            dtype: str = "float32", device: str = "cpu", on_stale: str = "error",
                            progress: bool = True) -> Path:
    """Write (or finish) the cache of every pair of `data_path`; returns its path. See the module docstring."""
    from mllm.data.preference_dataset import PreferenceCollator, PreferenceDataset
    from mllm.model.modeling_mllm import MLLMModel
    from mllm.model.tokenization import load_tokenizer

    if on_stale not in ("error", "recompute"):
        raise ValueError(f"on_stale must be 'error' or 'recompute', got {on_stale!r}")
    out = Path(out) if out is not None else cache_path(data_path, ref_name)
    if out.exists() and Path(data_path).exists() and os.path.samefile(out, data_path):
        raise NotACacheError(f"--out {out} is the preference data file itself; choose another cache file")
    read_cache(out)  # refuses a file that is not a cache before any work
    model = MLLMModel.from_pretrained(model_dir, dtype=DTYPES[dtype], device=device).eval()
    tokenizer = load_tokenizer(model_dir)
    dataset = PreferenceDataset.from_config(data_path, tokenizer, model.config, image_folder, max_slice_nums,
                                            model_max_length)
    settings = {"dtype": dtype, "max_slice_nums": dataset.image_processor.max_slice_nums,
                "model_max_length": model_max_length}
    expected = expected_header(model_dir, data_path, settings, pairs=len(dataset))

    header, done, good_end = read_cache(out)
    if header is not None and good_end < out.stat().st_size:
        with open(out, "r+b") as f:
            f.truncate(good_end)  # a torn last line from a killed run
    if header is not None:
        problems = header_mismatches(header, expected)
        if problems and on_stale == "error":
            raise StaleCacheError(f"{out} is stale: " + "; ".join(problems) +
                                  ". Delete it or pass --on_stale recompute")
        if problems:
            print(f"{out}: stale ({'; '.join(problems)}); recomputing it", file=sys.stderr)
            header, done = None, {}
    if header is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(expected) + "\n")
    pending = [i for i, key in enumerate(dataset.keys) if key not in done]
    collate = PreferenceCollator(pad_id=tokenizer.pad_token_id or 0)
    bar = tqdm(total=len(dataset), initial=len(dataset) - len(pending), desc="reference log-probs", unit="pair",
               disable=not progress)
    with open(out, "a", encoding="utf-8") as sink, torch.inference_mode():
        for start in range(0, len(pending), batch_size):
            batch = collate([dataset[i] for i in pending[start:start + batch_size]])
            labels = batch.pop("labels")
            idx = batch.pop("idx")
            logits = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).logits
            rows = pair_logps(logits, labels.to(logits.device), idx)
            sink.write("".join(json.dumps(r) + "\n" for r in rows))
            sink.flush()
            os.fsync(sink.fileno())
            bar.update(len(rows))
    bar.close()
    return out
