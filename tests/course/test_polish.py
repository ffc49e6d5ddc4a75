"""The base's polish rounds: each starts from the round before, describes scenes of a seed of its own, is reused
when finished and refused when its settings changed (the training itself is `preference.align`'s, tested there
and in test_course_base)."""

import json
from dataclasses import replace

import pytest

from mllm.course import polish as P
from mllm.course.shared import Budget


@pytest.fixture
def fake_training(monkeypatch):
    calls = []

    def align(model_dir, world, folder, settings, seed):
        calls.append((str(model_dir), seed, settings["pair_mode"], settings["steps"]))
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model.safetensors").write_bytes(f"weights of {folder.name}".encode())
        return {"model_dir": str(folder / "model"), "pairs": 10 + len(calls)}

    def answer_yesno(model, world, out, limit=None):
        (out / "yesno.json").write_text(json.dumps({"categories": {"count": {"acc": 0.5 + 0.1 * len(calls)}}}))
        return {"acc": 0.9}

    monkeypatch.setattr(P, "align", align)
    monkeypatch.setattr(P, "answer_yesno", answer_yesno)
    chair = {"Recall": 0.6, "CHAIRi": 0.03, "Echo": 0.0}
    monkeypatch.setattr(P, "describe_and_score", lambda model, world, out, limit=None: chair)
    monkeypatch.setattr(P, "ground_and_score", lambda model, world, out, limit=None: {"accuracy": 0.25})
    return calls


def test_rounds_chain_resume_and_refuse_other_settings(tmp_path, fake_training):
    budget = replace(Budget(), polish_rounds=2, polish_steps=7)
    start = tmp_path / "tune" / "model"
    start.mkdir(parents=True)
    (start / "model.safetensors").write_bytes(b"tune's weights")
    model, curve = P.polish(start, tmp_path / "world", tmp_path / "polish", budget, seed=3)
    assert model == tmp_path / "polish" / "round2" / "model"
    assert fake_training == [(str(start), 3 + P.ROUND_SEED, "cut", 7),
                             (str(tmp_path / "polish" / "round1" / "model"), 3 + 2 * P.ROUND_SEED, "cut", 7)]
    assert [entry["yesno"] for entry in curve] == [{"count": 0.6, "all": 0.9}, {"count": 0.7, "all": 0.9}]
    assert curve[1]["cpu_minutes"] >= curve[0]["cpu_minutes"] and curve[0]["recall"] == 0.6
    assert curve[0]["ground"] == {"acc": 0.25}
    record = json.loads((tmp_path / "polish" / "round2" / "done.json").read_text())
    assert record["pairs"] == 12 and record["started_from"]["model"] == str(tmp_path / "polish" / "round1" / "model")

    # a rerun reuses both rounds; a third round trains only the third
    P.polish(start, tmp_path / "world", tmp_path / "polish", budget, seed=3)
    assert len(fake_training) == 2
    P.polish(start, tmp_path / "world", tmp_path / "polish", replace(budget, polish_rounds=3), seed=3)
    assert len(fake_training) == 3 and fake_training[-1][0] == str(model)
    anchors = [json.loads((tmp_path / "polish" / f"round{r}" / "done.json").read_text())["settings"]["yesno_anchors"]
               for r in (1, 2, 3)]
    assert anchors == [0.34, 0.34, 0.5]  # each round's own (Budget.polish_yesno_anchors), reused with its round

    with pytest.raises(ValueError, match="round1: a finished round of other settings"):
        P.polish(start, tmp_path / "world", tmp_path / "polish", replace(budget, polish_steps=8), seed=3)
    # tune trained again (other weights in the same folder): its rounds are not reused
    (start / "model.safetensors").write_bytes(b"tune's weights, retrained")
    with pytest.raises(ValueError, match="round1: a finished round of other settings or from another model"):
        P.polish(start, tmp_path / "world", tmp_path / "polish", budget, seed=3)
    assert len(fake_training) == 3


def test_no_rounds_hand_back_the_tuned_model(tmp_path, fake_training):
    (tmp_path / "tune").mkdir()
    model, curve = P.polish(tmp_path / "tune", tmp_path / "world", tmp_path / "polish",
                            replace(Budget(), polish_rounds=0), seed=0)
    assert model == tmp_path / "tune" and curve == [] and fake_training == []


def test_round_settings_follow_the_budget():
    settings = P.round_settings(Budget())
    assert settings["pair_mode"] == "cut" and settings["pair_images"] == 1500 and settings["steps"] == 800
    assert settings["yesno_anchors"] == settings["box_anchors"] == 0.34 and settings["batch"] == 8
    # the rounds keep the machinery's rate, not the preference stage's own (which its finished rounds never ran)
    assert settings["lr"] == 1e-4 and "named_shapes" not in settings
    # yes/no anchors round by round, the last value for any round after: the third round asks more yes/no pairs
    assert [P.round_settings(Budget(), r)["yesno_anchors"] for r in (1, 2, 3, 4)] == [0.34, 0.34, 0.5, 0.5]
    assert {P.round_settings(Budget(), r)["box_anchors"] for r in (1, 2, 3, 4)} == {0.34}
    # count anchors only when asked for: finished rounds of the settings before them stay reusable
    assert "count_anchors" not in settings
    assert P.round_settings(replace(Budget(), polish_count_anchors=0.25), 2)["count_anchors"] == 0.25
    with pytest.raises(ValueError, match="polish_yesno_anchors needs at least one value"):
        P.round_settings(replace(Budget(), polish_yesno_anchors=()))
    quick = P.round_settings(Budget.quick())
    assert quick["steps"] == 4 and quick["pair_images"] == 4 and quick["batch"] == 4
