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
    assert set(scores) == {"chair", "yesno", "grounding", "rows"}
    # calibration: every score with its n, a chance baseline and a verdict; marks per answer; fits a phone
    assert [r["chance"] for r in scores["rows"]][2:4] == ["0.500", "0.250"]
    assert all(r["n"] and r["verdict"] for r in scores["rows"])
    assert "12 questions" in html and "6 pairs" in html and "name=\"viewport\"" in html
    assert html.count("&#10003;") + html.count("&#10007;") >= 4 * 2 + 1  # yes/no answers of 4 cases (+ legend)
    assert scores["yesno"]["n_questions"] == 12 and scores["grounding"]["n"] > 0
    assert 0.0 <= scores["chair"]["CHAIRi"] <= 1.0


def test_chance_baselines_and_highlighting_by_hand(tmp_path):
    from mllm.course.demo import binomial_verdict, chair_chance, grounding_chance, highlight_hallucinations
    from mllm.eval.chair import Vocabulary

    # naming 2 of 4 categories at random for an image holding 1: one of the two is always absent (CHAIRs 1),
    # each name is absent with probability 3/4 (CHAIRi 0.75), the present one is found half the time (Recall 0.5)
    sentences = [{"mscoco_generated_words": ["a", "b"], "mscoco_gt_words": ["a"]}]
    assert chair_chance(sentences, 4) == {"CHAIRs": 1.0, "CHAIRi": 0.75, "Recall": 0.5}
    # naming 1 of 4 with 2 present: CHAIRs = 1 - C(2,1)/C(4,1) = 0.5
    assert chair_chance([{"mscoco_generated_words": ["a"], "mscoco_gt_words": ["a", "b"]}], 4)["CHAIRs"] == 0.5
    # three boxes: two identical, one far away -> 2 of the 6 ordered pairs overlap
    (tmp_path / "rec_test.jsonl").write_text("".join(
        json.dumps({"bbox": b}) + "\n" for b in ([0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60])))
    assert grounding_chance(tmp_path) == 2 / 6
    assert binomial_verdict(0.52, 0.5, 100).startswith("AT CHANCE")  # 2 SE = 0.1
    assert binomial_verdict(0.75, 0.5, 100).startswith("above chance")
    vocab = Vocabulary({"circle": ["circle", "disc"], "star": ["star"]})
    marked = highlight_hallucinations("A red disc and two stars.", vocab, {"circle"})
    assert marked == "A red disc and two <mark title='not in the image'>stars</mark>."
