"""Training data that would train wrongly or crash later is named (file, record) or skipped and counted."""

import json
import re

import pytest
from PIL import Image

from test_answer_safety import mllm
from test_train_resume_safety import sft_args


def write(folder, records):
    Image.new("RGB", (56, 56), "red").save(folder / "0.png")
    (folder / "train.json").write_text(json.dumps(records))
    return folder


def record(conversations, image="0.png", id_=7):
    return {"id": id_, "image": image, "conversations": conversations}


def test_llava_roles_train_like_the_exercise_roles(tmp_path, tiny_checkpoint, capsys):
    data = write(tmp_path, [record([{"from": "human", "value": "<image>\nIs it red?"}, {"from": "gpt", "value": "Yes"}]),
                            record([{"role": "human", "content": "<image>\nIs it red?"},
                                    {"role": "gpt", "content": "Yes"}], id_=8)])
    assert mllm(*sft_args(tiny_checkpoint, data, tmp_path / "out", "--max_steps", "1")) == 0
    assert "train.json: 2 of 2 records used" in capsys.readouterr().out


@pytest.mark.parametrize("conversations, message", [
    ("Is it red? Yes", "record 0 (id 7): 'conversations' must be a list of messages"),
    ([{"role": "assistant", "content": "Yes"}], "record 0 (id 7): a conversation needs at least 2 messages"),
    ([{"role": "assistant", "content": "Yes"}, {"role": "assistant", "content": "No"}],
     "record 0 (id 7): the first (non-system) message must come from the user"),
    ([{"role": "bot", "content": "hi"}, {"role": "gpt", "content": "Yes"}], "record 0 (id 7): message 0: role 'bot'"),
])
def test_malformed_conversations_name_file_and_record(tmp_path, tiny_checkpoint, conversations, message, capsys):
    data = write(tmp_path, [record(conversations)])
    assert mllm(*sft_args(tiny_checkpoint, data, tmp_path / "out", "--max_steps", "1")) == 1  # no traceback
    assert f"train.json: {message}" in capsys.readouterr().err


def test_a_sample_cut_at_model_max_length_is_counted_and_reported(tmp_path, tiny_checkpoint, capsys):
    long = "<image>\nIs it red? " + "Look closely. " * 60
    data = write(tmp_path, [record([{"role": "user", "content": "<image>\nIs it red?"},
                                    {"role": "assistant", "content": "Yes " * 80}])])
    del long
    assert mllm(*sft_args(tiny_checkpoint, data, tmp_path / "out", "--max_steps", "1",
                          "--model_max_length", "80")) == 0
    assert "1 cut at model_max_length 80 (ids [7])" in capsys.readouterr().out


def test_skip_bad_images_skips_a_decompression_bomb(tmp_path, tiny_checkpoint, capsys):
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")  # 144 MP in a few KB
    data = write(tmp_path, [record([{"role": "user", "content": "<image>\nIs it red?"},
                                    {"role": "assistant", "content": "Yes"}], image="bomb.png", id_=1),
                            record([{"role": "user", "content": "<image>\nIs it red?"},
                                    {"role": "assistant", "content": "Yes"}], id_=2)])
    assert mllm(*sft_args(tiny_checkpoint, data, tmp_path / "out", "--max_steps", "1", "--skip_bad_images")) == 0
    assert "1 of 2 records used; 1 with bad images [(1, " in capsys.readouterr().out


def test_rec_lines_with_a_wrong_size_or_a_nan_box_are_named(tmp_path, capsys):
    Image.new("RGB", (200, 100), "white").save(tmp_path / "a.png")
    lines = [{"img_path": "a.png", "expression": "the red star", "bbox": [10, 10, 50, 60], "width": 400,
              "height": 200},  # the image was resized after annotation: its real size is what the model sees
             {"img_path": "a.png", "expression": "the blue moon", "bbox": [float("nan"), 0, 5, 5], "width": 200,
              "height": 100},
             {"img_path": "a.png", "expression": "the arrow", "bbox": [0, 0, float("inf"), 5]},
             {"img_path": "a.png", "expression": "the ring", "bbox": [20, 20, 40, 40], "width": 200, "height": 100}]
    rec = tmp_path / "rec.jsonl"
    rec.write_text("".join(json.dumps(line) + "\n" for line in lines))  # json writes NaN / Infinity
    out = tmp_path / "grounding.json"
    assert mllm("grounding", "prepare", "--rec", rec, "--image-root", tmp_path, "--out", out) == 0
    err = capsys.readouterr().err
    assert f"{rec}:1: width/height 400x200 differ from the image's real size 200x100" in err
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["size_mismatch"] == 1 and report["skipped"]["malformed"] == 2
    assert any(f"{rec}:2" in e for e in report["examples"]["malformed"])
    answers = [r["conversations"][1]["content"] for r in json.loads(out.read_text())]
    assert sorted(answers) == ["[100,200,200,400]", "[50,100,250,600]"]  # measured in the real 200x100 frame


def test_grounding_eval_skips_and_counts_unscorable_references(tmp_path, capsys):
    rows = [{"answer": "[0,0,500,500]", "metainfos": {"bbox": [0, 0, 50, 50], "width": 100, "height": 100}},
            {"answer": "[0,0,500,500]", "metainfos": {"bbox": [float("nan"), 0, 50, 50], "width": 100, "height": 100}},
            {"answer": "[0,0,500,500]", "metainfos": {"bbox": [0, 0, 50, 50], "width": 0, "height": 100}}]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "result.json"
    assert mllm("eval", "grounding", "--answers", answers, "--out", out, "--no-square-pad") == 0
    result = json.loads(out.read_text())
    assert result["overall"]["n"] == 1 and result["overall"]["accuracy"] == 1.0  # not 1 of 3
    assert len(result["skipped"]) == 2
    err = capsys.readouterr().err
    assert "skipped line 2: ground-truth box" in err and "skipped line 3: image size 0x100 is empty" in err
