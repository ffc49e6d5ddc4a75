"""Training data in the formats users already have -> the project's own records.

    records, name = read_conversations(path, data_format="auto", image_cache=None)    # SFT / grounding
    pairs, name = read_preference_pairs(path, image_cache=None)                        # preference

Containers (chosen by the path): a JSON list (`.json`), JSON lines (`.jsonl`, or a `.json` file that turns out
to hold one object per line), or Hugging Face `datasets` data: a `save_to_disk` folder, a `.parquet` file or a
folder of them (needs `datasets` / `pyarrow`, imported only then).

Record layouts (the same in every container; `auto` decides per file from the first record, and every later
record must have the same layout):

    minicpmv  {"id", "image": path | {"<image_00>": path, ...}, "conversations": [{"role", "content"}]}
              (the project's own format, returned unchanged)
    llava     {"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}
              (LLaMA-Factory's ShareGPT flavour, "images": [paths] beside from/value turns, reads the same)
    sharegpt  {"messages": [{"role": "user"|"assistant"|"system", "content": str | [parts]}], "images": [paths]}
              (LLaMA-Factory / ms-swift; parts are {"type": "text", "text"} / {"type": "image"[, "image"]})

Images: one image keeps the single `<image>` key (placed as the project always does); several images are
matched in order with the `<image>` placeholders of the text, which become `<image_00>`, `<image_01>`... (with
no placeholder at all they are put at the start of the first user message). List-of-parts content is joined
with "\\n", so [image, text] reads "<image>\\n" + text, the project's own single-image convention.

Image bytes (a `datasets` Image column: {"bytes", "path"} dicts, or PIL images) are written once to
`image_cache` (default: a `<data name>.images` folder next to the data), named by a hash of their content so a
rerun or another rank reuses them; the records then hold absolute paths, so `image_folder` does not apply to
them. Paths given as text stay relative to `image_folder` as before.

Preference pairs: the project's JSON ({idx, question, chosen, rejected, image_path | image (base64)}) as JSON or
JSON lines, or the RLAIF-V layout (openbmb/RLAIF-V-Dataset parquet: ds_name, image {bytes, path}, question,
chosen, rejected, origin_dataset, origin_split, idx (string), image_path); the extra columns go to `metainfos`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

from mllm.jsonio import read_json_records, read_jsonl

LAYOUTS = ("minicpmv", "llava", "sharegpt")
DATA_FORMATS = ("auto", *LAYOUTS, "hf")
IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
FORMAT_TABLE = """accepted formats (--data_format):
  minicpmv  {"image": path | {"<image_00>": path}, "conversations": [{"role": "user"|"assistant"|"system", "content": "<image>\\n..."}]}
  llava     {"image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}
  sharegpt  {"images": [paths], "messages": [{"role": "user"|"assistant"|"system", "content": str | [{"type": "text"|"image", ...}]}]}
  hf        a datasets save_to_disk folder or .parquet file(s) whose rows are any of the above (images as paths or bytes)
  (.jsonl files hold one such record per line)"""


class DataFormatError(ValueError):
    """A data file whose records fit no accepted format, or mix formats."""


# ---- containers: path -> (location, raw record) pairs ------------------------------------------------------------

def is_hf_source(path: Path) -> bool:
    """A `save_to_disk` folder, a parquet file, or a folder holding parquet files."""
    if path.suffix == ".parquet":
        return True
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
                              or any(path.rglob("*.parquet")))


def _need(module: str, path: Path):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{path}: reading Hugging Face datasets data needs the `{module}` package "
                          "(pip install datasets pyarrow)") from None


def _hf_rows(path: Path):
    """(location, row) pairs of a save_to_disk folder or parquet file(s), rows as stored by arrow: an Image
    column gives {"bytes", "path"} dicts (never decoded here)."""
    if path.suffix == ".parquet" or not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        parquet = _need("pyarrow.parquet", path)
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        index = 0
        for file in files:
            for batch in parquet.ParquetFile(file).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    yield f"record {index}" + (f" ({file.name})" if len(files) > 1 else ""), row
                    index += 1
        return
    datasets = _need("datasets", path)
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise DataFormatError(f"{path}: a DatasetDict with splits {list(data)}; give the split's folder "
                                  f"(e.g. {path / next(iter(data))})")
        data = next(iter(data.values()))
    data = data.flatten_indices() if data._indices is not None else data  # a select()/shuffle() view
    index = 0
    for batch in data.data.to_batches(max_chunksize=256):  # the arrow table: images stay undecoded bytes
        for row in batch.to_pylist():
            yield f"record {index}", row
            index += 1


def _json_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, record) pairs of a JSON list or a JSON-lines file; a malformed line is an error."""
    if path.suffix != ".jsonl":
        try:
            return [(f"record {i}", r) for i, r in enumerate(read_json_records(path))]
        except ValueError as err:
            if "Extra data" not in str(err):  # anything but "one object per line in a .json file"
                raise
    rows, skipped = read_jsonl(path)
    if skipped:
        raise DataFormatError(f"{path}: {len(skipped)} malformed JSON lines, first: line {skipped[0]['line']} "
                              f"({skipped[0]['reason']})")
    return [(f"record {i} (line {line})", r) for i, (line, r) in enumerate(rows)]


def read_rows(path: str | os.PathLike):
    """(location, raw record) pairs of any container, in file order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} not found")
    return _hf_rows(path) if is_hf_source(path) else iter(_json_rows(path))


# ---- images: paths stay, bytes go to the cache -------------------------------------------------------------------

def default_image_cache(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".images")


def _is_blob(value) -> bool:
    """A datasets Image value: {"bytes", "path"} (either may be None) or a PIL image."""
    return (isinstance(value, dict) and set(value) <= {"bytes", "path"} and bool(value)) or \
        type(value).__module__.startswith("PIL.")


def image_file(value, cache: Path) -> str:
    """A path for one image value: a path as it is; bytes written to `cache` (content-hashed) -> absolute path."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("bytes") is None:
        if isinstance(value.get("path"), str):
            return value["path"]
        raise ValueError(f"image value without bytes or path: {value!r:.200}")
    if isinstance(value, dict):
        data, suffix = bytes(value["bytes"]), Path(value.get("path") or "").suffix.lower()
    else:  # a decoded PIL image: stored losslessly
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data, suffix = buffer.getvalue(), ".png"
    suffix = suffix if suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff") else ".img"
    target = cache / f"{hashlib.sha256(data).hexdigest()[:24]}{suffix}"
    if not target.is_file():  # the name is the content: an existing file is this image
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return str(target.resolve())


# ---- layouts: raw record -> the project's record -----------------------------------------------------------------

def layout_of(record) -> str | None:
    """The record's layout (LAYOUTS), or None when it fits none."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return "sharegpt"
    if "conversations" not in record:
        return None
    turns = record["conversations"]
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]:
        return "llava"
    # the project's own records, also malformed ones: its validation names what is wrong (not a list, no user
    # turn, an unknown role) more precisely than "fits no format" would
    return "minicpmv"


def number_images(conversation: list[dict], images: list[str]) -> tuple[list[dict], dict[str, str] | str | None]:
    """Match images in order with the `<image>` placeholders: (conversation, the record's "image" value)."""
    if not images:
        return conversation, None
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in conversation if isinstance(m["content"], str))
    if len(images) == 1 and count <= 1:
        return conversation, images[0]  # the project's single-image key, placed as always
    if count == 0:  # no placeholder at all: every image at the start of the first user message
        first = next((m for m in conversation if m["role"] == "user"), None)
        if first is None or not isinstance(first["content"], str):
            raise ValueError("images but no user message to put them in")
        first["content"] = IMAGE_PLACEHOLDER * len(images) + "\n" + first["content"]
        count = len(images)
    if count != len(images):
        raise ValueError(f"{len(images)} images for {count} '<image>' placeholders in the text")
    keys = iter(f"<image_{k:02d}>" for k in range(len(images)))
    for m in conversation:
        if isinstance(m["content"], str):
            m["content"] = re.sub(re.escape(IMAGE_PLACEHOLDER), lambda _: next(keys), m["content"])
    return conversation, {f"<image_{k:02d}>": path for k, path in enumerate(images)}


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _from_llava(record: dict) -> tuple[list[dict], list]:
    turns = [{"role": LLAVA_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
             if isinstance(t, dict) else t for t in record["conversations"]]
    image = record.get("image")  # a datasets column may hold None where another row's flavour uses "images"
    return turns, _as_list(image if image is not None else record.get("images"))


def _from_sharegpt(record: dict) -> tuple[list[dict], list]:
    images, in_parts = _as_list(record.get("images")), []
    turns = []
    for m in record["messages"]:
        if not isinstance(m, dict):
            turns.append(m)
            continue
        content = m.get("content")
        if isinstance(content, list):  # parts: text joined with "\n", each image part a placeholder
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(part.get("text", ""))
                elif kind in ("image", "image_url"):
                    texts.append(IMAGE_PLACEHOLDER)
                    source = part.get("image", part.get("path", part.get("image_url")))
                    if isinstance(source, dict) and "url" in source:
                        source = source["url"]
                    if source is not None:
                        in_parts.append(source)
                else:
                    raise ValueError(f"content part {part!r:.100} is not {{'type': 'text' | 'image', ...}}")
            content = "\n".join(texts)
        turns.append({"role": m.get("role"), "content": content})
    if in_parts and images:
        raise ValueError("images both in the content parts and in 'images'; give them in one place")
    return turns, in_parts or images


def to_project_record(record: dict, layout: str, index: int, cache: Path) -> dict:
    """One raw record of `layout` -> {"id", "image"?, "conversations": [{"role", "content"}]}."""
    if layout == "minicpmv":
        image = record.get("image")
        if _is_blob(image):
            return {**record, "image": image_file(image, cache)}
        if isinstance(image, dict) and any(_is_blob(v) for v in image.values()):
            return {**record, "image": {k: image_file(v, cache) for k, v in image.items()}}
        return record  # unchanged
    turns, images = (_from_llava if layout == "llava" else _from_sharegpt)(record)
    turns = [dict(t) if isinstance(t, dict) else t for t in turns]
    if any(not isinstance(t, dict) for t in turns):
        raise ValueError("every turn must be an object")
    conversation, image = number_images(turns, [image_file(v, cache) for v in images])
    out = {"id": record.get("id", index), "conversations": conversation}
    if image is not None:
        out["image"] = image
    return out


def no_format_error(path, where: str, record) -> DataFormatError:
    keys = sorted(record) if isinstance(record, dict) else f"not an object but a {type(record).__name__}"
    return DataFormatError(f"{path}: {where} fits no accepted data format; its keys: {keys}\n{FORMAT_TABLE}")


def family(layout: str) -> str:
    """minicpmv and llava records differ only in their turns' keys, which the conversation reader maps turn by
    turn, so one file may mix them; sharegpt records are built differently."""
    return "conversations" if layout in ("minicpmv", "llava") else layout


def read_conversations(path: str | os.PathLike, data_format: str = "auto",
                       image_cache: str | os.PathLike | None = None) -> tuple[list[dict], str]:
    """(records in the project's own format, format name) of an SFT / grounding data file.

    The name is the layout ("minicpmv", "llava", "sharegpt"), prefixed "hf/" for datasets data. `data_format`
    "auto" detects it from the first record; a layout name or "hf" insists on it. Raises DataFormatError
    naming the file and the record for a record that fits no format or differs from the first one.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    path = Path(path)
    hf = is_hf_source(path)
    if data_format == "hf" and not hf:
        raise DataFormatError(f"{path}: --data_format hf needs a datasets save_to_disk folder or .parquet file(s)")
    cache = Path(image_cache) if image_cache is not None else default_image_cache(path)
    wanted = data_format if data_format in LAYOUTS else None
    records, first = [], None
    for index, (where, raw) in enumerate(read_rows(path)):
        layout = layout_of(raw)
        if layout is None:
            raise no_format_error(path, where, raw)
        if first is None:
            first = (where, layout)
            if wanted is not None and layout != wanted:
                raise DataFormatError(f"{path}: --data_format {wanted}, but {where} is {layout} (keys "
                                      f"{sorted(raw)})\n{FORMAT_TABLE}")
        elif family(layout) != family(first[1]):
            raise DataFormatError(f"{path}: mixed formats: {where} is {layout} (keys {sorted(raw)}), but "
                                  f"{first[0]} is {first[1]}; one file holds one format")
        try:
            records.append(to_project_record(raw, layout, index, cache))
        except ValueError as err:
            raise DataFormatError(f"{path}: {where} ({layout}): {err}") from None
    name = first[1] if first else (wanted or "minicpmv")
    return records, f"hf/{name}" if hf else name


# ---- preference pairs --------------------------------------------------------------------------------------------

PAIR_FIELDS = ("question", "chosen", "rejected")
RLAIFV_META = ("ds_name", "origin_dataset", "origin_split", "image_path")


def read_preference_pairs(path: str | os.PathLike, image_cache: str | os.PathLike | None = None
                          ) -> tuple[list[dict], str]:
    """(pairs in the project's preference format, format name: "pairs" or "rlaif-v") of a preference file.

    A row whose `image` is bytes ({"bytes", "path"} or PIL) is RLAIF-V's: the image goes to the cache and
    becomes `image_path`, the other RLAIF-V columns go to `metainfos`. Other rows are returned unchanged.
    """
    path = Path(path)
    cache = Path(image_cache) if image_cache is not None else default_image_cache(path)
    pairs, name = [], "pairs"
    for where, raw in read_rows(path):
        if not isinstance(raw, dict) or any(not isinstance(raw.get(k), str) for k in PAIR_FIELDS):
            keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise DataFormatError(
                f"{path}: {where} is not a preference pair; its keys: {keys}\naccepted: "
                "{idx, question, chosen, rejected, image_path | image (base64)} as JSON / JSON lines, or the "
                "RLAIF-V parquet layout {ds_name, image {bytes, path}, question, chosen, rejected, origin_dataset, "
                "origin_split, idx, image_path}")
        if not _is_blob(raw.get("image")):
            pairs.append(raw)
            continue
        name = "rlaif-v"
        meta = {k: raw[k] for k in RLAIFV_META if raw.get(k) is not None}
        pair = {k: raw[k] for k in PAIR_FIELDS}
        pair["image_path"] = image_file(raw["image"], cache)
        if raw.get("idx") is not None:
            pair["idx"] = raw["idx"]
        pair["metainfos"] = {**(raw.get("metainfos") or {}), **meta}
        pairs.append(pair)
    return pairs, f"hf/{name}" if is_hf_source(path) else name


def describe(path, count: int, name: str, data_format: str) -> str:
    """The line training prints once per data file."""
    how = "detected" if data_format == "auto" else "given"
    return f"data: {count:,} records, format {name} ({how}) from {path}"
