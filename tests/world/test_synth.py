"""`mllm synth`: schema of every file, truth of the annotations, the caption-noise rate, and determinism."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mllm.cli import synth as synth_cli
from mllm.world import scenes as S
from mllm.world import synth

ARGS = dict(n_train=40, n_test=12, seed=3, caption_noise=0.3, large_fraction=0.3)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    written = synth.generate(folder, workers=1, progress=False, **ARGS)
    assert all(path.exists() for path in written.values())
    return folder


def load(folder: Path, name: str):
    text = (folder / name).read_text()
    return [json.loads(line) for line in text.splitlines()] if name.endswith(".jsonl") else json.loads(text)


@pytest.fixture(scope="module")
def scenes(out) -> dict:
    return {r["image_id"]: r for r in load(out, "scenes.jsonl")}


def check_conversation(messages, n_turns=None):
    assert len(messages) % 2 == 0 and (n_turns is None or len(messages) == 2 * n_turns)
    for k, message in enumerate(messages):
        assert set(message) == {"role", "content"} and isinstance(message["content"], str) and message["content"]
        assert message["role"] == ("user" if k % 2 == 0 else "assistant")
        assert message["content"].count("<image>") == (1 if k == 0 else 0)
    assert messages[0]["content"].startswith("<image>\n")


def test_images_exist_at_recorded_sizes(out, scenes):
    assert len(scenes) == ARGS["n_train"] + ARGS["n_test"]
    for image_id, record in scenes.items():
        assert record["image"] == f"images/{record['split']}/{image_id}.png"
        with Image.open(out / record["image"]) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size == (record["width"], record["height"])
    sizes = [(r["width"], r["height"]) for r in scenes.values()]
    assert any(s in S.SMALL_SIZES for s in sizes) and any(s not in S.SMALL_SIZES for s in sizes)


@pytest.mark.parametrize("split", ["train", "test"])
def test_sft_records(out, scenes, split):
    records = load(out, f"sft_{split}.json")
    tasks = Counter(r["task"] for r in records)
    n = ARGS[f"n_{split}"]
    assert tasks["short"] == tasks["detailed"] == tasks["count"] == n and 0 < tasks["dialogue"] < n
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        assert set(record) == {"id", "image", "task", "conversations"} and isinstance(record["id"], str)
        assert record["image"].startswith(f"images/{split}/") and (out / record["image"]).exists()
        check_conversation(record["conversations"], None if record["task"] == "dialogue" else 1)
        if record["task"] == "dialogue":
            assert 2 <= len(record["conversations"]) // 2 <= 3
        if record["task"] == "count":
            scene = scenes[record["id"].rsplit("_", 1)[0]]
            category = S.mentioned_categories(record["conversations"][0]["content"])[0]
            expected = sum(o["category"] == category for o in scene["objects"])
            assert record["conversations"][1]["content"] == str(expected)


@pytest.mark.parametrize("split", ["train", "test"])
def test_yesno_records(out, scenes, split):
    records = load(out, f"yesno_{split}.json")
    assert len(records) == 2 * ARGS[f"n_{split}"]
    for first, second in zip(records[::2], records[1::2]):  # one image's pair is consecutive
        assert first["image"] == second["image"] and first["category"] == second["category"]
        assert first["category"] in ("existence", "color", "count", "position")
        assert sorted([first["conversations"][1]["content"], second["conversations"][1]["content"]]) == ["No", "Yes"]
        for record in (first, second):
            assert set(record) == {"id", "image", "category", "conversations"}
            check_conversation(record["conversations"], 1)
            assert record["conversations"][0]["content"].endswith(" Please answer yes or no.")
    assert [r["image"] for r in records[::2]] == [s["image"] for s in scenes.values() if s["split"] == split]


@pytest.mark.parametrize("split", ["train", "test"])
def test_rec_records_are_tight_and_unambiguous(out, scenes, split):
    records = load(out, f"rec_{split}.jsonl")
    n_objects = sum(len(s["objects"]) for s in scenes.values() if s["split"] == split)
    assert 0.9 * n_objects <= len(records) <= n_objects
    for record in records:
        assert set(record) == {"img_path", "expression", "bbox", "height", "width", "dataset_name", "image_id"}
        assert record["dataset_name"] == "synth" and (out / record["img_path"]).exists()
        scene_record = scenes[record["image_id"]]
        assert (record["width"], record["height"]) == (scene_record["width"], scene_record["height"])
        x0, y0, x1, y1 = record["bbox"]
        assert 0 <= x0 < x1 <= record["width"] and 0 <= y0 < y1 <= record["height"]
        scene = S.scene_from_dict(scene_record)
        hits = S.objects_matching(scene, *S.parse_referring_expression(record["expression"]))
        assert len(hits) == 1 and list(scene.objects[hits[0]].bbox) == record["bbox"], record


def test_bench_and_chair_gt(out, scenes):
    bench = load(out, "bench.jsonl")
    test_ids = [i for i, s in scenes.items() if s["split"] == "test"]
    assert [b["image_id"] for b in bench] == test_ids
    for line in bench:
        assert set(line) == {"image", "question", "image_id"} and line["question"] in S.DETAILED_PROMPTS
        assert line["image"] == scenes[line["image_id"]]["image"] and (out / line["image"]).exists()
    assert len({b["question"] for b in bench}) > 1
    chair = load(out, "chair_gt.json")
    assert chair["vocabulary"] == S.CATEGORIES and isinstance(chair["double_words"], dict)
    assert set(chair["images"]) == set(scenes)
    for image_id, objects in chair["images"].items():
        assert objects == sorted({o["category"] for o in scenes[image_id]["objects"]})


def test_preference_pairs(out, scenes):
    pairs = load(out, "preference_train.json")
    detailed = {r["image"]: r["conversations"][1]["content"]
                for r in load(out, "sft_train.json") if r["task"] == "detailed"}
    noised = set(load(out, "meta.json")["noised_ids"])
    assert [p["idx"] for p in pairs] == list(range(ARGS["n_train"]))
    for pair in pairs:
        assert {"idx", "question", "chosen", "rejected", "image_path"} <= set(pair)
        assert pair["question"] in S.DETAILED_PROMPTS and (out / pair["image_path"]).exists()
        assert pair["rejected"] != pair["chosen"] and len(pair["rejected"]) < 1.7 * len(pair["chosen"])
        if pair["metainfos"]["image_id"] + "_detailed" not in noised:
            assert pair["chosen"] == detailed[pair["image_path"]]
        present = {o["category"] for o in scenes[pair["metainfos"]["image_id"]]["objects"]}
        assert set(S.mentioned_categories(pair["chosen"])) == present


def test_caption_noise_rate_and_content(out, scenes):
    meta = load(out, "meta.json")
    assert meta["n_train_descriptions"] == 2 * ARGS["n_train"]
    assert len(meta["noised_ids"]) == round(ARGS["caption_noise"] * 2 * ARGS["n_train"]) == 24
    noised = set(meta["noised_ids"])
    n_seen = 0
    for split in ("train", "test"):
        for record in load(out, f"sft_{split}.json"):
            if record["task"] not in ("short", "detailed"):
                continue
            objects = [o["category"] for o in scenes[record["image"].split("/")[-1][:-4]]["objects"]]
            named = S.mentioned_categories(record["conversations"][1]["content"])
            if record["id"] in noised:
                n_seen += 1
                assert split == "train" and len(named) == len(objects) + 1 and len(set(named) - set(objects)) == 1
            else:
                assert Counter(named) == Counter(objects), record
    assert n_seen == len(noised)


def test_noise_rule_counts():
    assert len(synth.noised_description_ids(7, 0, 0.5)) == 7
    assert len(synth.noised_description_ids(7, 0, 0.25)) == round(3.5) == 4
    assert synth.noised_description_ids(5, 1, 0.0) == [] and len(synth.noised_description_ids(5, 1, 1.0)) == 10
    with pytest.raises(ValueError):
        synth.noised_description_ids(5, 1, 1.5)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_is_byte_deterministic_across_worker_counts(out, tmp_path, capsys):
    again = tmp_path / "again"
    argv = ["--out", str(again), "--n-train", "40", "--n-test", "12", "--seed", "3", "--caption-noise", "0.3",
            "--large-fraction", "0.3", "--workers", "2", "--quiet"]
    assert synth_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert str(again) in printed and "sft_train.json" in printed and "(40 records)" in printed
    digest = tree_digest(out)
    assert len(digest) == 52 + 11 and tree_digest(again) == digest


def test_noise_changes_only_the_noised_records(out, tmp_path):
    synth.generate(tmp_path, workers=1, progress=False, **{**ARGS, "caption_noise": 0.0})
    clean, noisy = load(tmp_path, "sft_train.json"), load(out, "sft_train.json")
    changed = {a["id"] for a, b in zip(clean, noisy) if a != b}
    assert changed == set(load(out, "meta.json")["noised_ids"])
    for name in ("yesno_train.json", "rec_train.jsonl", "preference_train.json", "sft_test.json", "chair_gt.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
