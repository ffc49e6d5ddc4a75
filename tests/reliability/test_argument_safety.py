"""Argument values that make no sense are refused when the command line is parsed, with a clear message."""

import pytest

from test_answer_safety import mllm


@pytest.mark.parametrize("args, message", [
    (["answer", "--questions", "q.jsonl", "--out", "a.jsonl", "--batch-size", "0"], "--batch-size: must be a positive"),
    (["answer", "--questions", "q.jsonl", "--out", "a.jsonl", "--batch-size", "-1"], "--batch-size: must be a positive"),
    (["answer", "--questions", "q.jsonl", "--out", "a.jsonl", "--limit", "-1"], "--limit: must be zero or more"),
    (["answer", "--questions", "q.jsonl", "--out", "a.jsonl", "--max-new-tokens", "-5"], "--max-new-tokens: must be a positive"),
    (["answer", "--questions", "q.jsonl", "--out", "."], "--out: . is a directory"),
    (["synth", "--out", "w", "--n-train", "-3"], "--n-train: must be zero or more"),
    (["logp", "--model", "m", "--data_path", "p.json", "--batch_size", "0"], "--batch_size: must be a positive"),
    (["preference", "pairs", "--model", "m", "--world", "w", "--out", "o", "--samples", "0"], "--samples: must be a positive"),
    (["eval", "grounding", "--answers", "a.jsonl", "--batch-size", "0"], "--batch-size: must be a positive"),
    (["train", "sft", "--model_name_or_path", "m", "--data_path", "d.json", "--no_tune_vision", "--no_tune_resampler",
      "--no_tune_llm"], "leave nothing to train"),
])
def test_nonsense_values_are_refused_at_parse_time(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text("")
    assert mllm(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "w").exists() and not (tmp_path / "a.jsonl").exists()
