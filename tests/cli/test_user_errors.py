"""No Python traceback for a user's mistake: every one of these ends with a message naming what is wrong and a
non-zero exit status (in-process: an exception escaping `main` is what would print a traceback)."""

import json

import pytest

from mllm.cli.main import main


@pytest.fixture
def files(tmp_path, tiny_checkpoint):
    """A few broken inputs next to good ones."""
    (tmp_path / "not_json.json").write_text("{oops")
    (tmp_path / "records.json").write_text(json.dumps([{"id": "1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yes"}]}]))  # LLaVA keys
    (tmp_path / "answers.jsonl").write_text('{"image_id": 1, "text": "a dog"}\n')
    (tmp_path / "gt.json").write_text(json.dumps({"vocabulary": {"dog": ["dog"]}, "images": {"1": ["dog"]}}))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "cfg.yaml").write_text("max_steps: [1,\n")
    return tmp_path


def cases(t, model):
    missing = str(t / "missing")
    return [
        ["no-such-verb"],
        ["train", "sft", missing + ".yaml"],
        ["train", "sft", str(t / "cfg.yaml")],
        ["train", "sft", "--model_name_or_path", missing, "--data_path", str(t / "records.json"),
         "--output_dir", str(t / "o1"), "--use_cpu", "true", "--report_to", "none"],
        ["train", "sft", "--model_name_or_path", model, "--data_path", missing + ".json",
         "--output_dir", str(t / "o2"), "--use_cpu", "true", "--report_to", "none"],
        ["train", "sft", "--model_name_or_path", model, "--data_path", str(t / "not_json.json"),
         "--output_dir", str(t / "o3"), "--use_cpu", "true", "--report_to", "none"],
        ["train", "preference", "--model_name_or_path", model, "--data_path", missing + ".json",
         "--output_dir", str(t / "o4"), "--use_cpu", "true", "--report_to", "none"],
        ["train", "grounding", "--model_name_or_path", model, "--rec", missing + ".jsonl",
         "--output_dir", str(t / "o5"), "--use_cpu", "true", "--report_to", "none"],
        ["init", "--preset", "enormous", "--out", str(t / "init")],
        ["answer", "--questions", missing + ".jsonl", "--out", str(t / "a.jsonl")],
        ["answer", "--model", missing, "--questions", str(t / "answers.jsonl"), "--out", str(t / "b.jsonl")],
        ["answer", "--questions", str(t / "empty.jsonl"), "--out", str(t / "c.jsonl")],
        ["eval", "chair", "--answers", str(t / "answers.jsonl"), "--chair-gt", missing + ".json", "--out", str(t / "r")],
        ["eval", "chair", "--answers", str(t / "answers.jsonl"), "--chair-gt", str(t / "gt.json"),
         "--out", str(t / "r2")],  # wrong caption key: the records have "text"
        ["eval", "chair", "--answers", missing + ".jsonl", "--chair-gt", str(t / "gt.json"), "--out", str(t / "r3")],
        ["eval", "yesno", "--answers", missing + ".jsonl", "--out", str(t / "y.json")],
        ["eval", "yesno", "--answers", str(t / "empty.jsonl"), "--out", str(t / "y2.json")],
        ["eval", "grounding", "--answers", missing + ".jsonl", "--out", str(t / "g.json")],
        ["logp", "--model", missing, "--data_path", str(t / "records.json")],
        ["chat", "--image", missing + ".png", "Hi?"],
        ["ground", "--image", missing + ".png", "the red circle"],
        ["merge", "--model", model, "--adapter", str(t / "adapter"), "--out", str(t / "merged")],
        ["synth", "--out", str(t / "a_file")],
        ["grounding", "prepare", "--rec", missing + ".jsonl", "--out", str(t / "prep.json")],
        ["course", "--stage", "nonsense"],
        ["demo", "--model", missing, "--out", str(t / "demo")],
    ]


def test_user_errors_end_with_a_message_and_no_traceback(files, tiny_checkpoint, capsys):
    all_cases = cases(files, str(tiny_checkpoint))
    assert len(all_cases) >= 20
    for argv in all_cases:
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's usage errors
            code = stop.code
        err = capsys.readouterr().err
        assert code not in (0, None), (argv, err)
        assert "Traceback" not in err and err.strip(), (argv, err)
        if argv[:2] == ["eval", "chair"] and argv[3].endswith("answers.jsonl") and "gt.json" in argv[5]:
            assert "'answer'" in err and "text" in err  # which key was looked for, which keys there are
