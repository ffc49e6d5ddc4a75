"""Yes/no scoring: MME parsing quirks, hand-worked acc / acc+ / score per category, the exercise's substring
accuracy, order independence, joining answers with a test.json, and the CLI."""

from __future__ import annotations

import json
import random

import pytest

from mllm.cli import eval_yesno
from mllm.eval import yesno
from mllm.eval.yesno import parse_yes_no, score


@pytest.mark.parametrize("answer,label", [
    ("yes", "yes"), ("Yes.", "yes"), ("YES", "yes"), ("No", "no"), ("no, it is not", "no"),
    ("Not sure", "no"), ("Nope", "no"), ("None of them", "no"), ("sure, yes", "other"),
    ("I think yes", "other"), ("", "other"), (" yes", "yes"), ("The answer is no", "other"),
])
def test_parse_yes_no(answer, label):
    assert parse_yes_no(answer) == label


# (category, image, target, answer)
ROWS = [
    ("existence", "1.jpg", "Yes", "Yes."), ("existence", "1.jpg", "No", "No"),            # image correct
    ("existence", "2.jpg", "Yes", "yes, there is"), ("existence", "2.jpg", "No", "Not sure"),  # correct (quirk)
    ("existence", "3.jpg", "Yes", "sure, yes"), ("existence", "3.jpg", "No", "no"),       # "other" -> wrong
    ("color", "4.jpg", "Yes", "No"), ("color", "4.jpg", "No", "No"),                      # wrong
    ("color", "5.jpg", "Yes", "YES"), ("color", "5.jpg", "No", "Nope"),                   # correct
]
RECORDS = [{"category": c, "image": i, "target": t, "answer": a} for c, i, t, a in ROWS]


def test_score_hand_worked():
    result = score(RECORDS)
    existence, color, overall = result["categories"]["existence"], result["categories"]["color"], result["overall"]
    assert (existence["acc"], existence["acc_plus"]) == (pytest.approx(5 / 6), pytest.approx(2 / 3))
    assert existence["score"] == pytest.approx(150.0)
    assert (color["acc"], color["acc_plus"], color["score"]) == (0.75, 0.5, 125.0)
    assert (overall["acc"], overall["acc_plus"], overall["other"]) == (0.8, 0.6, 1)
    assert overall["n_questions"] == 10 and overall["n_images"] == 5 and overall["unpaired_images"] == 0
    assert overall["exercise_accuracy"] == 0.5  # case-sensitive substring: "Not sure" counts, "yes, there is" not
    assert overall["exact_match"] == 0.2
    assert result["confusion"] == {"yes": {"yes": 3, "no": 1, "other": 1}, "no": {"yes": 0, "no": 5, "other": 0}}
    assert result["mme"]["perception"] == pytest.approx(275.0) and result["mme"]["cognition"] == 0


def test_grouping_by_image_not_line_order():
    shuffled = RECORDS[:]
    random.Random(0).shuffle(shuffled)
    assert score(shuffled)["categories"] == score(RECORDS)["categories"]
    # same file name in two categories: two different images
    same_name = [dict(r, image="x.jpg") for r in RECORDS[:2]] + [dict(r, image="x.jpg") for r in RECORDS[6:8]]
    assert score(same_name)["overall"]["n_images"] == 2


def test_bad_target_raises():
    with pytest.raises(ValueError, match="Maybe"):
        score([{"image": "a", "target": "Maybe", "answer": "yes"}])


def _test_items():
    items = []
    for k, (category, image, target, _) in enumerate(ROWS):
        items.append({"id": 100 + k, "image": f"data/images/{category}/{image}", "conversations": [
            {"role": "user", "content": f"<image>\nIs there thing {k}? Please answer yes or no."},
            {"role": "assistant", "content": target}]})
    return items


def test_join_with_test_file():
    items = _test_items()
    answers = [{"idx": k, "question": f"Is there thing {k}? Please answer yes or no.", "answer": row[3],
                "metainfos": {"id": 100 + k}} for k, row in enumerate(ROWS)]
    answers[0]["metainfos"] = {}  # falls back to idx
    answers[1]["question"] = "Something else?"
    answers.append({"idx": 99, "answer": "yes"})  # matches nothing
    records, problems = yesno.join_with_test(answers, items)
    assert problems == {"unmatched": 1, "question_mismatch": 1}
    assert score(records)["categories"] == score(RECORDS)["categories"]


def test_cli(tmp_path, capsys):
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps(_test_items()))
    lines = [json.dumps({"idx": k, "answer": row[3], "metainfos": {"id": 100 + k}}) for k, row in enumerate(ROWS)]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(lines[:3] + ["{oops"] + lines[3:]) + "\n")
    out = tmp_path / "result.json"
    assert eval_yesno.main(["--answers", str(answers), "--test", str(test_file), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["overall"]["acc_plus"] == 0.6 and result["skipped"][0]["line"] == 4
    assert "existence" in capsys.readouterr().out
    # an answers file that already carries target and category
    carried = [json.dumps({"idx": k, "answer": a, "target": t, "metainfos": {"image": f"data/images/{c}/{i}"}})
               for k, (c, i, t, a) in enumerate(ROWS)]
    answers.write_text("\n".join(carried) + "\n")
    assert eval_yesno.main(["--answers", str(answers), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["categories"]["color"]["score"] == 125.0
