"""Output folders that a command may write into, without ever destroying what it did not write.

A command that fills a whole folder (`mllm demo`, `mllm synth`, `mllm init`) first claims it:

- a missing or empty folder is created and claimed;
- a folder the same command made before (its marker file, `.mllm-output.json`, names the command and the
  entries it wrote) is cleaned of exactly those entries; whatever else is there (a user's notes, a copied
  report) stays;
- any other non-empty folder is refused with `OutputDirError`: the command never guesses what may go.

The marker is written before the command writes anything and lists every top-level entry that was not
there at that moment once the command finishes (`finish_output_dir`), so a rerun after a crash still knows
which entries are its own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = ".mllm-output.json"


class OutputDirError(ValueError):
    """The folder holds something the command did not write; nothing was changed."""


def _marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("owner"), str) else None


def _write_marker(folder: Path, data: dict) -> None:
    tmp = folder / (MARKER + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, folder / MARKER)


def claim_output_dir(folder: str | os.PathLike, owner: str) -> Path:
    """Make `folder` ready for `owner` to write (see the module docstring); returns it as a Path."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    marker = _marker(folder)
    present = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    if marker is None and present:
        shown = ", ".join(present[:5]) + (" ..." if len(present) > 5 else "")
        raise OutputDirError(f"{folder} is not empty ({shown}) and was not written by {owner}; choose a new or "
                             "empty folder (nothing there was changed)")
    if marker is not None and marker["owner"] != owner:
        raise OutputDirError(f"{folder} holds the output of {marker['owner']}, not of {owner}; choose another "
                             "folder (nothing there was changed)")
    if marker is not None:
        # A finished run lists its entries; a crashed one lists what was there before it started.
        ours = set(marker.get("entries", [])) if marker.get("finished") else set(present) - set(marker.get("kept", []))
        for name in sorted(ours & set(present)):
            path = folder / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        present = sorted(set(present) - ours)
    _write_marker(folder, {"owner": owner, "finished": False, "kept": present})
    return folder


def finish_output_dir(folder: str | os.PathLike) -> None:
    """Record the entries the claiming command wrote (everything new since the claim)."""
    folder = Path(folder)
    marker = _marker(folder)
    if marker is None:
        raise OutputDirError(f"{folder} was not claimed (no {MARKER})")
    kept = set(marker.get("kept", []))
    entries = sorted(p.name for p in folder.iterdir() if p.name != MARKER and p.name not in kept)
    _write_marker(folder, {"owner": marker["owner"], "finished": True, "entries": entries,
                           "kept": sorted(kept)})
