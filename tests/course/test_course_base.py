"""The base recipe end to end on a tiny world: phases, evaluations, and a second run that resumes instead of
training again (a finished vision pretraining is reused, the LLM phases resume at their last checkpoint)."""

import json

from safetensors.torch import load_file

from mllm.course.base import stage_base
from mllm.course.shared import Budget


def test_base_recipe_runs_and_a_rerun_resumes(tmp_path):
    budget = Budget(n_train=16, n_test=4, base_steps=5, base_frozen_steps=3, base_batch=4,
                    vision_pretrain_steps=4, vision_pretrain_batch=4, eval_limit=4)
    first = stage_base(tmp_path, budget, seed=0)
    base = tmp_path / "base"
    assert first["vision_pretrain"]["step"] == 4
    assert json.loads((base / "phase1" / "trainer_state.json").read_text())["global_step"] == 3
    assert json.loads((base / "phase2" / "trainer_state.json").read_text())["global_step"] == 2
    assert set(first["chair"]) == {"CHAIRs", "CHAIRi", "Recall", "Len"} and first["yesno"]["n_questions"] == 4
    weights = load_file(base / "model" / "model.safetensors")
    log = (base / "phase0" / "vision_pretrain_log.json").read_text()

    clocks = {name: json.loads((base / name / "training_minutes.json").read_text()) for name in ("phase1", "phase2")}
    assert [clocks[name]["global_step"] for name in ("phase1", "phase2")] == [3, 2]
    assert json.loads((base / "phase1" / "checkpoint-3" / "training_minutes.json").read_text())["global_step"] == 3
    vision = first["vision_pretrain"]["minutes"]
    assert first["train_minutes"] == round(vision + clocks["phase1"]["minutes"] + clocks["phase2"]["minutes"], 1)

    second = stage_base(tmp_path, budget, seed=0)
    assert (base / "phase0" / "vision_pretrain_log.json").read_text() == log
    # the resumed phases trained no step, and their clocks went on from what the checkpoints recorded
    for name in ("phase1", "phase2"):
        again = json.loads((base / name / "training_minutes.json").read_text())["minutes"]
        assert clocks[name]["minutes"] <= again < clocks[name]["minutes"] + 1.0
    assert second["train_minutes"] >= first["train_minutes"]
    again = load_file(base / "model" / "model.safetensors")
    assert all(bool((weights[k] == again[k]).all()) for k in weights)
    assert second["chair"] == first["chair"]


def test_phase_two_is_skipped_when_it_has_no_steps(tmp_path):
    budget = Budget(n_train=8, n_test=2, base_steps=2, base_frozen_steps=2, base_batch=4,
                    vision_pretrain_steps=2, vision_pretrain_batch=4, eval_limit=2)
    result = stage_base(tmp_path, budget, seed=0)
    assert not (tmp_path / "base" / "phase2").exists()
    phase1 = load_file(tmp_path / "base" / "phase1" / "model.safetensors")
    shipped = load_file(tmp_path / "base" / "model" / "model.safetensors")
    assert all(bool((phase1[k] == shipped[k]).all()) for k in phase1) and result["model_dir"].endswith("model")
