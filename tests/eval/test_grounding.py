"""Grounding accuracy: hand-made per-split set with exact hits, misses and parse failures; table; CLI."""

from __future__ import annotations

import json

import pytest

from mllm.cli import eval_grounding
from mllm.eval import grounding


def _reference(bbox, split, width=640, height=480):
    return {"bbox": bbox, "width": width, "height": height, "split": split}


# 640x480 image padded to 640x640 (80 px on top): pixel box [64, 112, 320, 400] is grid [100, 300, 500, 750]
# (values chosen so that pixel -> grid -> pixel is exact in floating point).
GT = [64, 112, 320, 400]
PREDICTIONS = [
    "[100,300,500,750]",             # refcoco_val: exact -> hit
    "<box>(100,300),(500,750)</box>",  # refcoco_val: same box in Qwen syntax -> hit
    "[500,300,100,750]",             # refcoco_val: x1 < x0 -> parse failure
    "[100,300,300,750]",             # refcoco_testA: half the width, IoU 0.5 exactly -> hit (>=)
    "[100,300,299,750]",             # refcoco_testA: IoU just under 0.5 -> miss
    "I cannot find it.",             # refcocog_test: parse failure
    "[0.1,0.3,0.5,0.75]",            # my_split: normalised floats -> hit
]
REFERENCES = [_reference(GT, s) for s in ["refcoco_val"] * 3 + ["REC_refcoco_unc_testA"] * 2 +
              ["refcocog_test", "my_split"]]


def test_score_per_split():
    result = grounding.score(PREDICTIONS, REFERENCES)
    splits = result["splits"]
    assert set(splits) == {"refcoco_val", "refcoco_testA", "refcocog_test", "my_split"}
    assert (splits["refcoco_val"]["correct"], splits["refcoco_val"]["n"]) == (2, 3)
    assert splits["refcoco_val"]["parse_failures"] == 1
    assert splits["refcoco_val"]["parse_failure_rate"] == pytest.approx(1 / 3)
    assert splits["refcoco_testA"]["accuracy"] == 0.5
    assert splits["refcocog_test"] == {"n": 1, "correct": 0, "accuracy": 0.0, "parse_failures": 1,
                                       "parse_failure_rate": 1.0, "mean_iou": 0.0, "formats": {}}
    assert splits["my_split"]["accuracy"] == 1.0 and splits["my_split"]["formats"] == {"plain_norm": 1}
    overall = result["overall"]
    assert (overall["correct"], overall["n"], overall["parse_failures"]) == (4, 7, 2)
    assert result["samples"][3]["iou"] == pytest.approx(0.5)
    assert result["samples"][0]["pred_box"] == pytest.approx(GT)


def test_threshold_and_padding_conventions():
    strict = grounding.score(PREDICTIONS[3:4], REFERENCES[3:4], threshold=0.5000001)
    assert strict["overall"]["correct"] == 0
    # the same grid text read without square padding is another box: y 300 -> 144 px and 750 -> 360 px,
    # IoU = (256 * 216) / (256 * 288) = 0.75
    unpadded = grounding.score(PREDICTIONS[:1], REFERENCES[:1], square_pad=False)
    assert unpadded["samples"][0]["pred_box"] == pytest.approx([64, 144, 320, 360])
    assert unpadded["samples"][0]["iou"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        grounding.score(["[1,2,3,4]"], [])


def test_format_table_orders_standard_splits():
    table = grounding.format_table(grounding.score(PREDICTIONS, REFERENCES)).splitlines()
    assert [line.split()[0] for line in table[1:]] == ["refcoco_val", "refcoco_testA", "refcocog_test", "my_split",
                                                       "overall"]
    assert table[1].split()[1:] == ["3", "66.67", "33.33"]


def test_cli(tmp_path, capsys):
    lines = [json.dumps({"idx": i, "answer": p, "metainfos": r}) for i, (p, r) in enumerate(zip(PREDICTIONS,
                                                                                                REFERENCES))]
    lines.insert(2, "{broken")
    answers = tmp_path / "preds.jsonl"
    answers.write_text("\n".join(lines) + "\n")
    out = tmp_path / "result.json"
    assert eval_grounding.main(["--answers", str(answers), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["overall"]["correct"] == 4 and result["overall"]["n"] == 7
    assert result["skipped"] == [{"line": 3, "reason": "malformed JSON: Expecting property name enclosed in "
                                                        "double quotes"}]
    assert "refcoco_val" in capsys.readouterr().out
