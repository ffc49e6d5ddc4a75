"""`mllm demo` end to end (on the random test checkpoint, so it runs without the shipped model too)."""

import json

from mllm.cli.demo import main


def test_demo_writes_report_and_scores(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "demo"
    assert main(["--model", str(tiny_checkpoint), "--out", str(out), "--n-eval", "6", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {(out / 'report.html').resolve()}" in printed
    html = (out / "report.html").read_text()
    assert html.count("<div class='case'>") == 4 and "data:image/png;base64," in html
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores) == {"chair", "yesno", "grounding"}
    assert scores["yesno"]["n_questions"] == 12 and scores["grounding"]["n"] > 0
    assert 0.0 <= scores["chair"]["CHAIRi"] <= 1.0
