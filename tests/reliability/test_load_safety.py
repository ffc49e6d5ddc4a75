"""Checkpoints and configs that would load wrongly are refused when loading, naming file and field."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_answer_safety import mllm
from tests.eval.test_answer import write_questions


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def answer_with(model, tmp_path):
    questions = write_questions(tmp_path, 1)
    return mllm("answer", "--model", model, "--questions", questions, "--out", tmp_path / "a.jsonl")


@pytest.mark.parametrize("key, value, message", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("use_sliding_window", True, "use_sliding_window"),
    ("layer_types", ["sliding_attention", "full_attention"], "layer_types"),
])
def test_config_keys_the_model_would_ignore_are_refused(tmp_path, tiny_checkpoint, key, value, message, capsys):
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config[key] = value
    (model / "config.json").write_text(json.dumps(config))
    assert answer_with(model, tmp_path) == 1  # one line on stderr, no traceback
    assert f"config.json: not implemented by this model: {message}" in capsys.readouterr().err


def test_a_config_missing_a_required_key_names_it(tmp_path, tiny_checkpoint, capsys):
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    del config["hidden_size"]
    (model / "config.json").write_text(json.dumps(config))
    assert answer_with(model, tmp_path) == 1
    assert "config.json: missing required key(s) ['hidden_size']" in capsys.readouterr().err


def test_all_nan_weights_are_refused_when_loading(tmp_path, tiny_checkpoint, capsys):
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    state = load_file(str(model / "model.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
              str(model / "model.safetensors"))
    assert answer_with(model, tmp_path) == 2  # a usage error with the reason, not a traceback
    assert "hold NaN or infinite values" in capsys.readouterr().err


def test_a_shard_index_pointing_outside_the_folder_is_refused(tmp_path, tiny_checkpoint, capsys):
    model = copy_checkpoint(tiny_checkpoint, tmp_path / "m")
    elsewhere = tmp_path / "elsewhere.safetensors"
    (model / "model.safetensors").rename(elsewhere)
    keys = list(load_file(str(elsewhere)))
    index = {"metadata": {}, "weight_map": {k: "../elsewhere.safetensors" for k in keys}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert answer_with(model, tmp_path) == 2
    assert "outside the checkpoint folder" in capsys.readouterr().err
