"""The verb table: help, sub-verbs, unknown verbs, and every verb's parser."""

from __future__ import annotations

import importlib
import json

import pytest

from mllm.cli.main import VERBS, main


def test_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {verb} " in out for verb in VERBS)


def test_unknown_verb_and_bare_group_exit_2(capsys):
    assert main(["nope"]) == 2
    assert "unknown verb 'nope'" in capsys.readouterr().err
    assert main(["train"]) == 2
    assert "choose one of: sft, grounding, preference" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["demo", "train sft", "course", "init", "eval chair"])
def test_verb_help_exits_0_with_its_program_name(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb.split(), "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def test_every_verb_module_is_a_thin_cli_module():
    for module_name, _ in VERBS.values():
        module = importlib.import_module(module_name)
        assert module_name.startswith("mllm.cli.") and callable(module.main)


@pytest.mark.parametrize("verb", ["chat", "answer", "ground", "eval grounding", "preference pairs", "demo"])
def test_every_inference_verb_takes_device_dtype_attention_and_adapter(verb, capsys):
    with pytest.raises(SystemExit):
        main([*verb.split(), "--help"])
    out = capsys.readouterr().out
    for option in ("--device", "--dtype", "--attn", "--adapter"):
        assert option in out, (verb, option)


def test_a_cuda_device_without_a_gpu_is_a_usage_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--device", "cuda", "--out", "unused-demo-dir"])
    assert stop.value.code == 2 and "no CUDA GPU is visible" in capsys.readouterr().err


def test_flash_attention_without_flash_attn_or_a_gpu_is_a_usage_error(capsys, tmp_path):
    from transformers.utils import is_flash_attn_2_available

    from mllm.model.loading import check_attention

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    (tmp_path / "q.jsonl").write_text('{"id": 1, "image": "a.png", "question": "Hi?"}\n')
    with pytest.raises(SystemExit) as stop:
        main(["answer", "--questions", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "a.jsonl"),
              "--device", "cpu", "--attn", "flash_attention_2"])
    assert stop.value.code == 2 and "needs the flash-attn package and a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(ValueError, match="choose one of"):
        check_attention("flashy", "cpu", None)


def test_answer_takes_the_exercise_test_json_and_eval_yesno_scores_it_alone(tmp_path, tiny_checkpoint, capsys):
    """`mllm synth`'s yesno_test.json -> `mllm answer` -> `mllm eval yesno` without --test: the whole loop."""
    from mllm.world.synth import generate

    world = tmp_path / "world"
    generate(world, n_train=0, n_test=3, seed=2, caption_noise=0.0, progress=False)
    items = json.loads((world / "yesno_test.json").read_text())
    answers = tmp_path / "answers.jsonl"
    assert main(["answer", "--model", str(tiny_checkpoint), "--questions", str(world / "yesno_test.json"),
                 "--out", str(answers), "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == len(items) > 0
    assert rows[0]["question"] == items[0]["conversations"][0]["content"].replace("<image>", "").strip()
    assert main(["eval", "yesno", "--answers", str(answers), "--out", str(tmp_path / "yesno.json")]) == 0
    assert json.loads((tmp_path / "yesno.json").read_text())["overall"]["n_questions"] == len(items)


def test_answer_exits_non_zero_when_it_answered_nothing(tmp_path, tiny_checkpoint, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"image": "missing.png", "question": "Is it red?"}\n')
    assert main(["answer", "--model", str(tiny_checkpoint), "--questions", str(questions),
                 "--out", str(tmp_path / "a.jsonl")]) == 1
    assert "none of the 1 question(s) could be answered" in capsys.readouterr().err


def test_interactive_chat_switches_images(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """`/image FILE` in the interactive chat loads the new image and restarts the conversation (it raised a
    NameError before: `load_image` was never imported there)."""
    import io

    from PIL import Image

    Image.new("RGB", (56, 56), "red").save(tmp_path / "a.png")
    Image.new("RGB", (56, 56), "blue").save(tmp_path / "b.png")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"Is it red?\n/image {tmp_path / 'b.png'}\nIs it blue?\n\n"))
    assert main(["chat", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "a.png"),
                 "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "(new image; conversation restarted)" in err and "error:" not in err
