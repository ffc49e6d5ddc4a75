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
def test_malformed_conversations_name_file_and_record(tmp_path, tiny_checkpoint, conversations, message):
    data = write(tmp_path, [record(conversations)])
    with pytest.raises(ValueError, match=re.escape(f"train.json: {message}")):
        mllm(*sft_args(tiny_checkpoint, data, tmp_path / "out", "--max_steps", "1"))


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
