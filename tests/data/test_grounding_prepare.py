"""Grounding data preparation: box checks by hand, every problem counted, tasks and styles, Flickr grounded
captions, mix-in ratio, determinism, square padding, and the box -> text -> box acceptance round trip."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from mllm.cli.grounding_prepare import main
from mllm.data.boxes import grid_to_pixel, parse_box
from mllm.data.grounding_prepare import (GROUNDING_PROMPT, PrepareOptions, box_text, check_box, grounded_caption,
                                         prepare, rec_conversations, report_path)


def test_check_box_worked_examples():
    assert check_box([10, 20, 30, 40], 100, 50) == ([10, 20, 30, 40], "ok")
    assert check_box([0, 0, 100, 50], 100, 50) == ([0, 0, 100, 50], "ok")  # x1, y1 exclusive: may equal w, h
    assert check_box([-1.5, 3, 101, 52], 100, 50) == ([0, 3, 100, 50], "clipped")  # <= 2 px over
    assert check_box([-2.5, 3, 60, 40], 100, 50) == (None, "overshoot")
    assert check_box([100, 10, 120, 20], 100, 50) == (None, "outside")
    assert check_box([-30, -20, -1, 10], 100, 50) == (None, "outside")
    assert check_box([30, 10, 30, 20], 100, 50) == (None, "degenerate")
    assert check_box([30, 25, 40, 20], 100, 50) == (None, "degenerate")


def _world(tmp_path, sizes=((64, 48), (40, 80))):
    """Two images and a REC file whose lines hit every case."""
    (tmp_path / "imgs").mkdir()
    for k, size in enumerate(sizes):
        Image.new("RGB", size, (20 * k, 100, 200)).save(tmp_path / "imgs" / f"{k}.png")
    lines = [
        {"img_path": "imgs/0.png", "expression": "the red star", "bbox": [16, 12, 48, 36], "width": 64, "height": 48},
        {"img_path": "imgs/1.png", "expression": "the blue disc", "bbox": [4, 8, 20, 40], "width": 40, "height": 80},
        {"img_path": "imgs/0.png", "expression": "the edge", "bbox": [50, 40, 65.5, 48], "width": 64, "height": 48},
        {"img_path": "imgs/0.png", "expression": "too far", "bbox": [50, 40, 70, 48], "width": 64, "height": 48},
        {"img_path": "imgs/0.png", "expression": "gone", "bbox": [70, 0, 90, 10], "width": 64, "height": 48},
        {"img_path": "imgs/0.png", "expression": "flat", "bbox": [10, 10, 10, 20], "width": 64, "height": 48},
        {"img_path": "imgs/missing.png", "expression": "x", "bbox": [1, 1, 5, 5], "width": 64, "height": 48},
    ]
    rec = tmp_path / "rec.jsonl"
    rec.write_text("\n".join(json.dumps(line) for line in lines[:3]) + "\n{broken\n"
                   + "\n".join(json.dumps(line) for line in lines[3:]) + "\n")
    return rec


def test_prepare_counts_every_problem(tmp_path, capsys):
    rec = _world(tmp_path)
    out = tmp_path / "out" / "train.json"
    report = prepare(out, [rec], shuffle=False)
    records = json.loads(out.read_text())
    assert [r["id"] for r in records] == ["REC_0", "REC_1", "REC_2"]  # id = running line index
    assert report["read"] == 8 and report["written"] == {"rec": 3} and report["clipped"] == 1
    assert report["skipped"] == {"malformed": 1, "missing_image": 1, "degenerate": 1, "outside": 1, "overshoot": 1}
    assert report["examples"]["overshoot"][0].startswith(f"{rec}:5")
    assert json.loads(report_path(out).read_text())["skipped"] == report["skipped"]
    assert "skipped: malformed 1, missing_image 1, degenerate 1, outside 1, overshoot 1" in capsys.readouterr().out
    first = records[0]
    assert first["image"] == "imgs/0.png"
    assert first["conversations"][0] == {"role": "user",
                                         "content": "<image>\n" + GROUNDING_PROMPT.format(expression="the red star")}
    # 64x48 image, unpadded frame: x / 64 * 1000, y / 48 * 1000, truncated
    assert first["conversations"][1] == {"role": "assistant", "content": "[250,250,750,750]"}
    assert records[2]["conversations"][1]["content"] == "[781,833,1000,1000]"  # the clipped box


def test_reg_task_qwen_style_and_square_pad(tmp_path):
    rec = _world(tmp_path)
    out = tmp_path / "train.json"
    options = PrepareOptions(tasks=("rec", "reg"), style="qwen", square_pad=True, padded_dir=tmp_path / "padded")
    prepare(out, [rec], options=options, shuffle=False, quiet=True)
    records = {r["id"]: r for r in json.loads(out.read_text())}
    assert sorted(records) == ["REC_0", "REC_1", "REC_2", "REG_0", "REG_1", "REG_2"]
    # 40x80 image padded to 80x80 (20 px left): [4, 8, 20, 40] -> [(24/80), 8/80, 40/80, 40/80] * 1000
    assert records["REC_1"]["conversations"][1]["content"] == "<ref>the blue disc</ref><box>(300,100),(500,500)</box>"
    assert records["REC_1"]["conversations"][0]["content"].startswith("<image>\nWhere is <ref>the blue disc</ref>")
    reg = records["REG_1"]["conversations"]
    assert "<box>(300,100),(500,500)</box>" in reg[0]["content"] and reg[1]["content"] == "the blue disc"
    padded = Image.open(tmp_path / records["REC_1"]["image"])
    assert padded.size == (80, 80) and padded.getpixel((5, 40)) == (255, 255, 255)  # white pad on the left
    assert padded.getpixel((40, 40)) == (20, 100, 200)


def test_flickr_grounded_captions(tmp_path):
    Image.new("RGB", (100, 50)).save(tmp_path / "123.jpg")
    line = {"id": 0, "image_id": "123", "sentence": "<ph_st>A man<ph_ed> holds <ph_st>two cups<ph_ed> .",
            "boxes": [[10, 5, 30, 45], [50, 10, 60, 20], [70, 10, 80, 20], [200, 0, 300, 10]],
            "boxes_seq": [[0], [1, 2, 3]]}
    flickr = tmp_path / "flickr.jsonl"
    flickr.write_text(json.dumps(line) + "\n")
    out = tmp_path / "gc.json"
    report = prepare(out, flickr_files=[flickr], options=PrepareOptions(tasks=("gc",)), quiet=True)
    (record,) = json.loads(out.read_text())
    assert record["id"] == "GC_0" and record["image"] == "123.jpg"
    caption = "A man [100,100,300,900] holds two cups [500,200,600,400;700,200,800,400] ."
    assert record["conversations"][1]["content"] == caption
    assert report["skipped"]["outside"] == 1  # box 3 dropped, its phrase keeps the other two
    qwen = grounded_caption(line["sentence"], [[[10, 5, 30, 45]], None], 100, 50, "qwen", False)
    assert qwen == "<ref>A man</ref><box>(100,100),(300,900)</box> holds two cups ."


def test_mix_ratio_and_determinism(tmp_path):
    rec = _world(tmp_path)
    general = [{"id": f"g{i}", "image": "imgs/0.png", "conversations": []} for i in range(10)]
    mix = tmp_path / "general.json"
    mix.write_text(json.dumps(general))
    options = PrepareOptions(tasks=("rec", "reg"), seed=3)
    a = prepare(tmp_path / "a.json", [rec], options=options, mix=mix, mix_ratio=0.25, quiet=True)
    prepare(tmp_path / "b.json", [rec], options=options, mix=mix, mix_ratio=0.25, quiet=True)
    prepare(tmp_path / "c.json", [rec], options=PrepareOptions(tasks=("rec", "reg"), seed=4), mix=mix,
            mix_ratio=0.25, quiet=True)
    assert a["written"] == {"rec": 3, "reg": 3, "mix": 2}  # 6 grounding records: 2 / 8 = 0.25
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert (tmp_path / "a.json").read_text() != (tmp_path / "c.json").read_text()
    records = json.loads((tmp_path / "a.json").read_text())
    assert sum(r["id"].startswith("g") for r in records) == 2


def test_turns_per_image_joins_questions_of_one_image(tmp_path):
    rec = _world(tmp_path)
    out = tmp_path / "multi.json"
    report = prepare(out, [rec], options=PrepareOptions(tasks=("rec", "reg"), turns_per_image=3), quiet=True)
    records = json.loads(out.read_text())
    assert report["written"] == {"rec": 3, "reg": 3} and report["records"] == 3  # 4 questions -> 3 + 1, and 2
    assert sorted(len(r["conversations"]) for r in records) == [2, 4, 6]
    for record in records:
        users = [m["content"] for m in record["conversations"][0::2]]
        assert users[0].startswith("<image>\n") and not any("<image>" in u for u in users[1:])
        assert [m["role"] for m in record["conversations"]] == ["user", "assistant"] * len(users)


def test_rec_conversations_keeps_the_course_format(tmp_path):
    rec = _world(tmp_path)
    records = rec_conversations(rec, per_image=1)
    assert [r["id"] for r in records] == ["REC_0", "REC_1"]  # one line per image
    assert records[0]["conversations"][1]["content"] == "[250,250,750,750]"


def test_cli(tmp_path, capsys):
    rec = _world(tmp_path)
    out = tmp_path / "cli.json"
    assert main(["--rec", str(rec), "--out", str(out), "--tasks", "rec,reg", "--templates", "random"]) == 0
    assert len(json.loads(out.read_text())) == 6
    assert report_path(out).is_file()
    with pytest.raises(SystemExit):
        main(["--rec", str(rec), "--out", str(out), "--tasks", "nope"])
    assert "unknown task" in capsys.readouterr().err


@pytest.mark.parametrize("size", [(640, 640), (640, 200), (150, 900)], ids=["square", "wide", "tall"])
@pytest.mark.parametrize("style", ["plain", "qwen"])
@pytest.mark.parametrize("square_pad", [False, True], ids=["unpadded", "padded"])
def test_round_trip_within_one_grid_cell(size, style, square_pad):
    """Acceptance: pixel box -> answer text -> parsed grid box -> pixel box reproduces it within one cell."""
    width, height = size
    side = max(size)
    cell_x, cell_y = ((side, side) if square_pad else size)
    cell_x, cell_y = cell_x / 1000, cell_y / 1000
    rng = random.Random(f"{size}{style}{square_pad}")
    for _ in range(200):
        x0, x1 = sorted(rng.uniform(0, width) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, height) for _ in range(2))
        box = [x0, y0, x1 + 1e-3, y1 + 1e-3]
        text = box_text([box], width, height, style, square_pad, ref="it" if style == "qwen" else None)
        grid_box, fmt = parse_box(text)
        assert fmt == style
        back = grid_to_pixel(grid_box, width, height, square_pad=square_pad)
        for v, w, cell in zip(back, box, (cell_x, cell_y, cell_x, cell_y)):
            assert w - cell - 1e-9 <= v <= w + 1e-9  # truncation: never above, at most one cell below
