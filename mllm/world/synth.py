"""`mllm synth`: generate the synthetic scene world and every task file under one folder.

    mllm synth --out DIR --n-train 2000 --n-test 200 --seed 0 [--caption-noise 0.2]   (`mllm.cli.synth`)

Files written (paths inside the folder; every image path in a record is relative to the folder):
    images/{train,test}/synth_{split}_{index:06d}.png
    sft_{train,test}.json        short/detailed descriptions, counting, multi-turn dialogues
    yesno_{train,test}.json      MME-style pairs: one "Yes" and one "No" question per image, consecutive
    bench.jsonl                  Object HalBench style, one detailed-description request per test image
    rec_{train,test}.jsonl       Shikra REC style referring expressions with pixel boxes
    preference_train.json        chosen (correct detailed description) vs rejected (one corruption)
    chair_gt.json                CHAIR vocabulary and ground-truth categories of every image
    scenes.jsonl                 full scene annotations (objects, boxes, sizes), train then test
    meta.json                    seed, counts, caption noise and the ids of the noised records

Determinism: scene `index` of `split` is drawn from random.Random(f"scene/{seed}/{split}/{index}") and its
texts from random.Random(f"text/{seed}/{split}/{index}") (string seeds hash with SHA-512, not with Python's
salted hash), so the bytes written depend on neither the worker count nor the order work finishes in.

Caption-noise rule: every train image has exactly one short and one detailed description record, so there
are n = 2 * n_train train descriptions; exactly k = round(caption_noise * n) of them (Python's round, half
to even), drawn by random.Random(f"noise/{seed}").sample, mention one extra object whose category is not
in the image, inserted at a random place in the list. Dialogue turns, test files, the benchmark and
preference `chosen` texts are never noised. Noising a record changes no other record.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
from pathlib import Path

from tqdm import tqdm

from mllm.world.scenes import (CATEGORIES, COLOURS, DETAILED_PROMPTS, DOUBLE_WORDS, SHORT_PROMPTS, SYNONYM_P,
                               Scene, absent_mention, counting_qa, detailed_description, dialogue,
                               preference_rejected, referring_expression, render_scene, sample_scene,
                               scene_from_dict, scene_mentions, scene_to_dict, short_description,
                               with_extra_mention, yesno_pair)

GENERATOR_VERSION = "synth-1"
SPLITS = ("train", "test")
DIALOGUE_P = 0.25  # fraction of images that also get a 2-3 turn dialogue
PNG_COMPRESS_LEVEL = 1  # fast; PNG stays lossless


def image_id_of(split: str, index: int) -> str:
    return f"synth_{split}_{index:06d}"


def image_path_of(split: str, index: int) -> str:
    return f"images/{split}/{image_id_of(split, index)}.png"


# ---- scenes and pixels (parallel) --------------------------------------------------------------------------------

def _render_job(job: tuple) -> dict:
    out_dir, seed, split, index, large_fraction, max_objects = job
    rng = random.Random(f"scene/{seed}/{split}/{index}")
    scene = sample_scene(rng, image_id_of(split, index), large_fraction, max_objects)
    image, scene = render_scene(scene)
    image.save(Path(out_dir) / image_path_of(split, index), compress_level=PNG_COMPRESS_LEVEL)
    return scene_to_dict(scene)


def render_scenes(out_dir: Path, seed: int, counts: dict[str, int], large_fraction: float, max_objects: int,
                  workers: int, progress: bool) -> dict[str, list[Scene]]:
    """Sample, draw and save every image; return the scenes (with boxes) per split, in index order."""
    jobs = [(str(out_dir), seed, split, i, large_fraction, max_objects)
            for split in SPLITS for i in range(counts[split])]
    bar = tqdm(total=len(jobs), desc="synth scenes", unit="img", disable=not progress)
    records = []
    if workers <= 1:
        for job in jobs:
            records.append(_render_job(job))
            bar.update()
    else:
        # spawn, not fork: the caller may hold torch's thread pools, which a forked child must not inherit
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for record in pool.imap(_render_job, jobs, chunksize=16):  # imap keeps job order
                records.append(record)
                bar.update()
    bar.close()
    scenes = [scene_from_dict(r) for r in records]
    return {"train": scenes[:counts["train"]], "test": scenes[counts["train"]:]}


# ---- texts (serial, cheap) ---------------------------------------------------------------------------------------

def conversation(turns: list[tuple[str, str]]) -> list[dict]:
    """[(user, assistant), ...] -> role/content messages; the image placeholder opens the first user turn."""
    messages = []
    for k, (user, assistant) in enumerate(turns):
        messages.append({"role": "user", "content": ("<image>\n" if k == 0 else "") + user})
        messages.append({"role": "assistant", "content": assistant})
    return messages


def noised_description_ids(n_train: int, seed: int, caption_noise: float) -> list[str]:
    """Ids of the train description records that get one hallucinated object (see the module docstring)."""
    if not 0.0 <= caption_noise <= 1.0:
        raise ValueError(f"caption_noise must be in [0, 1], got {caption_noise}")
    ids = [f"{image_id_of('train', i)}_{kind}" for i in range(n_train) for kind in ("short", "detailed")]
    return sorted(random.Random(f"noise/{seed}").sample(ids, round(caption_noise * len(ids))))


def image_records(scene: Scene, split: str, index: int, seed: int, noised: set[str]) -> dict:
    """Every record about one image: sft, yesno, rec, bench and preference (the last two per split)."""
    rng = random.Random(f"text/{seed}/{split}/{index}")
    image, image_id = image_path_of(split, index), scene.image_id
    plain = scene_mentions(scene, rng)  # canonical names: what short descriptions say
    detailed = scene_mentions(scene, rng, SYNONYM_P)
    variant = rng.randrange(2)

    def maybe_noised(record_id: str, mentions: list) -> list:
        if record_id not in noised:
            return mentions
        noise_rng = random.Random(f"noise/{seed}/{record_id}")
        return with_extra_mention(mentions, absent_mention(scene, noise_rng, mentions), noise_rng)

    sft = []
    for task, prompts, mentions, write in (("short", SHORT_PROMPTS, plain, short_description),
                                           ("detailed", DETAILED_PROMPTS, detailed,
                                            lambda m: detailed_description(m, variant))):
        record_id = f"{image_id}_{task}"
        turns = [(rng.choice(prompts), write(maybe_noised(record_id, mentions)))]
        sft.append({"id": record_id, "image": image, "task": task, "conversations": conversation(turns)})
    sft.append({"id": f"{image_id}_count", "image": image, "task": "count",
                "conversations": conversation([counting_qa(scene, rng)])})
    if rng.random() < DIALOGUE_P:
        sft.append({"id": f"{image_id}_dialogue", "image": image, "task": "dialogue",
                    "conversations": conversation(dialogue(scene, rng))})

    category, pair = yesno_pair(scene, rng)
    yesno = [{"id": f"{image_id}_q{k}", "image": image, "category": category,
              "conversations": conversation([qa])} for k, qa in enumerate(pair)]

    rec = []
    for i, obj in enumerate(scene.objects):
        expression = referring_expression(scene, i, rng)
        if expression is not None:
            rec.append({"img_path": image, "expression": expression, "bbox": list(obj.bbox),
                        "height": scene.height, "width": scene.width, "dataset_name": "synth", "image_id": image_id})

    bench = {"image": image, "question": rng.choice(DETAILED_PROMPTS), "image_id": image_id}
    rejected, corruption = preference_rejected(scene, detailed, rng)
    preference = {"idx": index, "question": rng.choice(DETAILED_PROMPTS),
                  "chosen": detailed_description(detailed, variant),
                  "rejected": detailed_description(rejected, variant), "image_path": image,
                  "metainfos": {"image_id": image_id, "corruption": corruption}}
    return {"sft": sft, "yesno": yesno, "rec": rec, "bench": bench, "preference": preference}


# ---- files -------------------------------------------------------------------------------------------------------

def _write_json_list(path: Path, records: list) -> None:
    """A JSON list with one record per line: valid JSON, and greppable."""
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    path.write_text("[\n" + body + "\n]\n" if records else "[]\n", encoding="utf-8")


def _write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


class WorldDirError(ValueError):
    """The output folder holds something other than a world of the same parameters; nothing was changed."""


def check_world_dir(out_dir: Path, params: dict, overwrite: bool) -> None:
    """Refuse (or, for another world with overwrite, clear) an output folder; see `generate`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise WorldDirError(f"{out_dir} is a file, not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or "files" not in meta:
        raise WorldDirError(f"{out_dir} is not empty and holds no synthetic world (no meta.json); choose a new or "
                            "empty folder (nothing there was changed)")
    changed = sorted(k for k, v in params.items() if meta.get(k) != v)
    if not changed:
        return  # the same world: every file is rewritten with the same bytes
    if not overwrite:
        raise WorldDirError(f"{out_dir} holds a world of other parameters ({', '.join(changed)} differ); choose "
                            "another folder, or pass --overwrite to replace that world")
    for name in list(meta["files"].values()) + ["images"]:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def generate(out_dir: str | os.PathLike, n_train: int, n_test: int, seed: int, caption_noise: float = 0.0,
             large_fraction: float = 0.15, max_objects: int = 6, workers: int | None = None,
             progress: bool = True, overwrite: bool = False) -> dict[str, Path]:
    """Write the whole dataset under out_dir; return {file key: path}. Same arguments, same bytes.

    out_dir must be missing, empty, or a world of the same parameters (rewritten byte for byte); a world of
    other parameters is refused unless `overwrite`, and then its own files are removed first (so no old image
    stays beside the new ones); a non-empty folder that is not a world is always refused (WorldDirError)."""
    out_dir = Path(out_dir)
    check_world_dir(out_dir, {"generator_version": GENERATOR_VERSION, "seed": seed, "n_train": n_train,
                              "n_test": n_test, "large_fraction": large_fraction, "max_objects": max_objects,
                              "caption_noise": caption_noise}, overwrite)
    counts = {"train": n_train, "test": n_test}
    noised_ids = noised_description_ids(n_train, seed, caption_noise)
    for split in SPLITS:
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    # One process by default: at 2,000 images PNG writes and file creation dominate, and a second process
    # (spawn start-up included) measured slower on 2 cores; more workers pay off only for large sets.
    workers = 1 if workers is None else workers
    scenes = render_scenes(out_dir, seed, counts, large_fraction, max_objects, workers, progress)

    files: dict[str, list] = {key: [] for key in ("sft_train", "sft_test", "yesno_train", "yesno_test", "rec_train",
                                                  "rec_test", "bench", "preference_train", "scenes")}
    noised = set(noised_ids)
    for split in SPLITS:
        for index, scene in enumerate(scenes[split]):
            records = image_records(scene, split, index, seed, noised)
            files[f"sft_{split}"] += records["sft"]
            files[f"yesno_{split}"] += records["yesno"]
            files[f"rec_{split}"] += records["rec"]
            files["scenes"].append({"split": split, "image": image_path_of(split, index), **scene_to_dict(scene)})
            if split == "test":
                files["bench"].append(records["bench"])
            else:
                files["preference_train"].append(records["preference"])

    paths = {"sft_train": "sft_train.json", "sft_test": "sft_test.json", "yesno_train": "yesno_train.json",
             "yesno_test": "yesno_test.json", "bench": "bench.jsonl", "rec_train": "rec_train.jsonl",
             "rec_test": "rec_test.jsonl", "preference_train": "preference_train.json", "scenes": "scenes.jsonl"}
    for key, name in paths.items():
        (_write_jsonl if name.endswith(".jsonl") else _write_json_list)(out_dir / name, files[key])

    chair_gt = {"vocabulary": CATEGORIES, "double_words": DOUBLE_WORDS,
                "images": {s.image_id: sorted({o.category for o in s.objects})
                           for split in SPLITS for s in scenes[split]}}
    (out_dir / "chair_gt.json").write_text(json.dumps(chair_gt, indent=1) + "\n", encoding="utf-8")
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "n_train": n_train, "n_test": n_test,
            "large_fraction": large_fraction, "max_objects": max_objects, "caption_noise": caption_noise,
            "n_train_descriptions": 2 * n_train, "noised_ids": noised_ids,
            "noise_rule": "exactly round(caption_noise * n_train_descriptions) train short/detailed records",
            "counts": {key: len(records) for key, records in files.items()},
            "categories": CATEGORIES, "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
            "files": {**paths, "chair_gt": "chair_gt.json", "meta": "meta.json"}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    written = {key: out_dir / name for key, name in meta["files"].items()}
    written["images_train"], written["images_test"] = out_dir / "images" / "train", out_dir / "images" / "test"
    return written
