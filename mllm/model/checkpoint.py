"""Reading and writing model weights: safetensors only, single file or sharded, written atomically.

A checkpoint folder holds `config.json` plus either `model.safetensors` or `model-0000k-of-0000n.safetensors`
shards with a `model.safetensors.index.json` (the Hugging Face layout, which MiniCPM-V 2.6 uses). Loading checks
the tensors against the model and fails with one message listing every missing, unexpected or mis-shaped tensor.
Pickle-based weight files (`*.bin`, `*.pt`) are refused: they can run code when loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the model it is loaded into."""


class ModelNotFoundError(FileNotFoundError):
    """A --model that is neither a folder nor a hub id present in the local Hugging Face cache."""


def resolve_model_dir(name: str | os.PathLike) -> Path:
    """A model folder, or a hub id (`openbmb/MiniCPM-V-2_6`) resolved to its snapshot in the local Hugging Face
    cache (HF_HUB_CACHE / HF_HOME honoured). Nothing is downloaded: this project never reaches a hub at run time."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    parts = text.split("/")
    if len(parts) != 2 or not all(parts) or text.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{text}: no such model folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"{text}: not a folder, and not in the local Hugging Face cache ({HF_HUB_CACHE}); this project never "
            f"downloads weights at run time -- fetch it first (e.g. `huggingface-cli download {text}`) or pass "
            f"--model DIR ({type(err).__name__})") from None


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder, in shard order."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        index = _read_json(folder / INDEX_FILE)
        if "weight_map" not in index:
            raise CheckpointError(f"{folder / INDEX_FILE}: no 'weight_map' field")
        names = sorted(set(index["weight_map"].values()))
        root = folder.resolve()
        outside = [n for n in names if not isinstance(n, str) or (folder / n).resolve().parent != root]
        if outside:  # a shard name is a plain file name beside the index, never a path elsewhere
            raise CheckpointError(f"{folder / INDEX_FILE}: weight_map names files outside the checkpoint folder: "
                                  f"{outside[:5]}")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder / INDEX_FILE}: shard files missing: {missing}")
        return [folder / n for n in names]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {pickled}: pickle weight files are not loaded; convert them to safetensors)" if pickled else ""
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def load_state_dict(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, optionally cast to `dtype` (floating tensors only)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    state[key] = tensor
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises several error types for damaged files
            raise CheckpointError(f"{path}: cannot read safetensors file ({err})") from err
    return state


def stored_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint folder, read from the safetensors headers alone."""
    shapes = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises several error types for damaged files
            raise CheckpointError(f"{path}: cannot read safetensors file ({err})") from err
    return shapes


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CheckpointError naming the floating tensors that hold NaN or infinity (a diverged or damaged save)."""
    bad = sorted(k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        shown = ", ".join(bad[:8]) + (f" ... and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise CheckpointError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values: {shown}")


def check_state_dict(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError listing missing, unexpected and mis-shaped tensors."""
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected)
    misshaped = sorted(
        f"{k}: checkpoint {tuple(getattr(found[k], 'shape', found[k]))} vs model {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(getattr(found[k], "shape", found[k])) != tuple(expected[k])
    )
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"  {len(items)} {title} tensor(s):\n    {shown}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model\n" + "\n".join(problems))


def save_state_dict(state: dict[str, torch.Tensor], folder: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write tensors as one safetensors file, or shards plus an index when larger than `max_shard_bytes`.

    Every file is written under a temporary name and renamed into place, so a crash never leaves a
    half-written checkpoint that looks complete. Stale files of an earlier layout are removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        _atomic_save(shards[0], folder / SINGLE_FILE, metadata)
        _remove(folder / INDEX_FILE)
        for old in folder.glob("model-*-of-*.safetensors"):
            _remove(old)
        return
    weight_map = {}
    names = []
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        names.append(name)
        _atomic_save(shard, folder / name, metadata)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    _atomic_write_text(folder / INDEX_FILE, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _remove(folder / SINGLE_FILE)
    for old in folder.glob("model-*-of-*.safetensors"):
        if old.name not in names:
            _remove(old)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.exists():
        path.unlink()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err


# ---- fingerprints ---------------------------------------------------------------------------------------------
FINGERPRINT_CHUNK = 1 << 20  # bytes hashed at each end of a file
FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "chat_template.jinja", "vocab.json", "merges.txt", "model.safetensors.index.json")


def hash_file_ends(path: Path, digest) -> None:
    """Feed `digest` the file's name, size and first and last MiB (the whole file when smaller): fast on an 8B
    shard, and changed by any edit at either end or of the length."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        if size <= 2 * FINGERPRINT_CHUNK:
            digest.update(f.read())
            return
        digest.update(f.read(FINGERPRINT_CHUNK))
        f.seek(size - FINGERPRINT_CHUNK)
        digest.update(f.read(FINGERPRINT_CHUNK))


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over a checkpoint folder's config, tokenizer files and weight files (`hash_file_ends` each)."""
    import hashlib

    folder = Path(model_dir)
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        if (folder / name).is_file():
            hash_file_ends(folder / name, digest)
    for path in weight_files(folder):
        hash_file_ends(path, digest)
    return digest.hexdigest()


def adapter_fingerprint(adapter_dir: str | os.PathLike) -> str:
    """sha256 over a PEFT adapter folder's config and weights (`hash_file_ends` each)."""
    import hashlib

    folder = Path(adapter_dir)
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if (folder / name).is_file():
            hash_file_ends(folder / name, digest)
    return digest.hexdigest()
