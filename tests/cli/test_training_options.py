"""`mllm train <verb> CONFIG.yaml --flag value`: config files with overrides, dashes = underscores, short help,
clean errors; and every example config in configs/ runs as it is on the shipped model and a synthetic world."""

import json
from pathlib import Path

import pytest

from mllm.cli.main import main
from mllm.cli.train_sft import parse_args

REPO = Path(__file__).resolve().parents[2]


def test_file_then_overrides_later_wins_and_dashes_equal_underscores(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\ndata_path: d.json\nmax_steps: 7\nlearning-rate: 0.5\nuse_lora: true\n")
    model, data, training = parse_args([str(config), "--max-steps", "2", "--output_dir", str(tmp_path / "o")])
    assert (model.model_name_or_path, data.data_path) == ("m", "d.json")
    assert training.max_steps == 2 and training.learning_rate == 0.5 and model.use_lora is True  # file, then flag
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps({"model_name_or_path": "m", "data_path": "d.json", "max_steps": 3}))
    assert parse_args([str(as_json), "--per-device-train-batch-size=5"])[2].per_device_train_batch_size == 5
    assert parse_args(["--model-name-or-path", "m", "--data-path", "d.json"])[0].model_name_or_path == "m"


@pytest.mark.parametrize("verb", ["sft", "grounding", "preference"])
def test_help_is_short_grouped_and_names_the_verb(verb, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", verb, "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith(f"usage: mllm train {verb} ")
    assert "model:" in out and "data:" in out and "training" in out and len(out.splitlines()) < 90
    with pytest.raises(SystemExit):
        main(["train", verb, "--help-all"])
    assert len(capsys.readouterr().out.splitlines()) > 300  # every TrainingArguments option


@pytest.mark.parametrize("content, name, message", [
    (None, "missing.yaml", "no such config file"),
    ("max_steps: [1,\n", "bad.yaml", "bad.yaml:2: not valid YAML"),
    ('{"max_steps": 1,}', "bad.json", "bad.json:1: not valid JSON"),
    ("- a\n- b\n", "list.yaml", "holds a mapping"),
    ("model_name_or_path: m\ndata_path: d\nmax_stepz: 3\n", "typo.yaml", "unknown option(s) max_stepz"),
])
def test_config_file_errors_are_one_line_usage_errors(tmp_path, capsys, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        main(["train", "sft", str(path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err


@pytest.fixture(scope="module")
def world_cwd(tmp_path_factory):
    """A folder laid out as the configs expect: runs/world (a small synthetic world) and the shipped model."""
    from mllm.world.synth import generate

    root = tmp_path_factory.mktemp("configs")
    generate(root / "runs" / "world", n_train=16, n_test=4, seed=3, caption_noise=0.0, progress=False)
    (root / "mllm" / "assets").mkdir(parents=True)
    (root / "mllm" / "assets" / "tiny-base").symlink_to(REPO / "mllm" / "assets" / "tiny-base")
    return root


@pytest.mark.parametrize("verb", ["sft", "grounding", "preference"])
def test_every_example_config_runs_as_it_is(verb, world_cwd, monkeypatch, capsys):
    monkeypatch.chdir(world_cwd)
    config = REPO / "configs" / f"{verb}_tiny.yaml"
    out = world_cwd / "runs" / f"{verb}_tiny"
    extra = ["--eval_limit", "4"] if verb == "grounding" else []
    assert main(["train", verb, str(config), "--max_steps", "2", "--report_to", "none", "--use_cpu", "true",
                 "--disable_tqdm", "true", *extra]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()  # where the config says
    if verb == "preference":  # the reference log-probs were computed on the way, next to the data
        assert list((world_cwd / "runs" / "world").glob("preference_train.*.logp.jsonl"))


@pytest.mark.parametrize("has_bf16_kernels", [False, True])
def test_bf16_on_a_cpu_without_bf16_kernels_gets_a_note(has_bf16_kernels, tmp_path, monkeypatch, capsys):
    """--bf16 (training) and --dtype bfloat16 (inference) on an AVX2-only CPU, where bf16 is emulated (a training
    step 18x, `mllm answer` 4.4x slower than float32, measured): the run goes on, with a note that says so; where
    bf16 is fast, no note."""
    import argparse

    import torch

    from mllm.cli import train_sft
    from mllm.cli.arguments import device_and_dtype
    from mllm.model import loading

    monkeypatch.setattr(loading, "bf16_autocast_pays", lambda device_type: has_bf16_kernels)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    flags = ["--model-name-or-path", "m", "--data-path", "d.json", "--output_dir", str(tmp_path)]
    note = train_sft.slow_bf16_note(parse_args(flags + ["--use_cpu", "--bf16"])[2])
    assert train_sft.slow_bf16_note(parse_args(flags + ["--use_cpu"])[2]) is None  # float32: nothing to say
    parser = argparse.ArgumentParser(prog="mllm answer")
    assert device_and_dtype(parser, argparse.Namespace(device="cpu", dtype="bfloat16")) == ("cpu", "bfloat16")
    assert device_and_dtype(parser, argparse.Namespace(device="cpu", dtype="auto")) == ("cpu", "float32")
    err = capsys.readouterr().err
    if has_bf16_kernels:
        assert note is None and err == ""
    else:
        assert "no bf16 kernels" in note and "drop --bf16" in note
        assert err.count("mllm answer: note: this CPU has no bf16 kernels") == 1  # bfloat16's call only
