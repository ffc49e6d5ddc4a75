"""`mllm course --stage preference`: before / after CHAIR, pairs, reward accuracy over all pairs."""

from __future__ import annotations

import json
import shutil

import pytest

from mllm.model.modeling_mllm import MLLMModel


def test_course_stage_on_a_tiny_world(tiny_checkpoint, tmp_path):
    """The course stage end to end: before / after CHAIR with the same decoding, curves, table rows."""
    from types import SimpleNamespace

    from mllm.course.preference import course_stage
    from mllm.world.synth import generate

    with pytest.raises(FileNotFoundError, match="run `mllm course --stage base` first"):
        course_stage(tmp_path, SimpleNamespace(), 0)
    generate(tmp_path / "world", n_train=6, n_test=3, seed=0, progress=False)
    shutil.copytree(tiny_checkpoint, tmp_path / "base" / "model")
    budget = SimpleNamespace(n_train=6, eval_limit=3, preference_steps=2, preference_batch=3,
                             preference_pair_mode="balanced", preference_bench_scenes=4)
    result = course_stage(tmp_path, budget, seed=0)
    assert result["stage"] == "preference" and result["pairs"] == 6
    # The random model's own samples name no object, so no sampled pair: the stage says so and takes the world's.
    summary = json.loads((tmp_path / "preference" / "self_pairs" / "pairs_summary.json").read_text())
    assert summary["samples"] == 6 and summary["pairs"] == 0
    assert (tmp_path / "preference" / "fresh_scenes" / "chair_gt.json").is_file()  # described scenes it never saw
    assert result["pairs_source"] == str(tmp_path / "world" / "preference_train.json")
    assert set(result["before"]) == set(result["after"]) == {"CHAIRs", "CHAIRi", "Recall", "Len", "Echo"}
    assert 0.0 <= result["reward_accuracy"] <= 1.0 and result["settings"]["steps"] == 2
    assert 0.0 <= result["reward_accuracy_all_pairs"] <= 1.0
    assert (tmp_path / "preference" / "pairs.after.logp.jsonl").is_file()  # the trained policy's pass over the pairs
    assert (tmp_path / "preference" / "model" / "reward_curves.png").is_file()
    assert (tmp_path / "preference" / "pairs.base.logp.jsonl").is_file()
    assert result["table_rows"][0].startswith("| preference | CHAIRs / CHAIRi | ")
    assert result["table_rows"][-1].startswith("| preference | yes/no acc | ")
    assert result["yesno_before"]["n_questions"] == 3 and "acc" in result["yesno_after"]
    # CHAIR on fresh scenes of a seed of its own too, before and after, with the change's spread
    bench = result["fresh_bench"]
    assert bench["scenes"] == 4 and bench["seed"] == 9090 and set(bench["change"]) == {"CHAIRs", "CHAIRi"}
    answers = tmp_path / "preference" / "fresh_bench" / "after" / "bench_answers_greedy.jsonl"
    described = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(described) == 4 and {d["image_id"] for d in described}.isdisjoint({"synth_train_000000"})
    assert result["table_rows"][1].startswith("| preference | CHAIRs / CHAIRi, 4 fresh scenes (change, 5-95 %) | ")
    # the random model names no object: no object sentence, none of them hedged
    assert bench["hedged"] == {"before": 0.0, "after": 0.0}
    assert result["table_rows"][2].startswith('| preference | Recall / objects called "object", 4 fresh scenes | ')
    MLLMModel.from_pretrained(result["model_dir"])


def test_course_stage_corrects_the_models_greedy_descriptions(tiny_checkpoint, tmp_path):
    """Continuation pairs: each greedy description the random model writes is wrong, so each is paired with the
    scene's own description (it names nothing right), and yes/no anchors join them. The default, hedge pairs, finds
    no object sentence with a misnamed shape in them: the world's pairs are taken."""
    from types import SimpleNamespace

    from mllm.course.preference import course_stage
    from mllm.world.synth import generate

    generate(tmp_path / "world", n_train=6, n_test=3, seed=0, progress=False)
    shutil.copytree(tiny_checkpoint, tmp_path / "base" / "model")
    budget = SimpleNamespace(n_train=6, eval_limit=3, preference_steps=2, preference_batch=3)
    result = course_stage(tmp_path, budget, seed=0)
    assert result["fresh_bench"] is None  # eval_limit: no bench
    # the stage's own defaults: hedge pairs with 0.075 as many named ones, at 3e-5 (the polish rounds keep FULL's)
    assert {k: result["settings"][k] for k in ("pair_mode", "named_shapes", "lr")} == \
        {"pair_mode": "hedge", "named_shapes": 0.075, "lr": 3e-5}
    assert result["pairs_source"] == str(tmp_path / "world" / "preference_train.json")
    shutil.rmtree(tmp_path / "preference")
    budget.preference_pair_mode = "continuation"
    result = course_stage(tmp_path, budget, seed=0)
    assert result["pairs_source"] == str(tmp_path / "preference" / "self_pairs" / "pairs.json")
    pairs = json.loads((tmp_path / "preference" / "self_pairs" / "pairs.json").read_text())
    sources = [p["metainfos"]["source"] for p in pairs]
    described = sources.count("continuation")
    assert described >= 1 and sources.count("yesno_anchor") == round(0.34 * described)
    assert result["pairs"] == min(len(pairs), 6)  # steps x batch of them trained


def test_reward_accuracy_over_all_pairs_compares_policy_and_reference_rewards(tmp_path, monkeypatch):
    import mllm.course.preference as course_preference
    from mllm.train import logp

    def cache(name, rows):
        path = tmp_path / f"pairs.{name}.logp.jsonl"
        lines = [{"format": logp.FORMAT}] + [{"idx": i, "chosen_logp": c, "rejected_logp": r, "chosen_avg_logp": ca,
                                         "rejected_avg_logp": ra} for i, (c, r, ca, ra) in enumerate(rows)]
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return path

    cache("base", [(-10.0, -10.0, -1.0, -1.0)] * 3)
    # rewards (policy - reference), sums: pair 0 +1 vs -1 (right), pair 1 -2 vs -1 (wrong), pair 2 0 vs 0 (a tie
    # is not a win); token means: all three right
    after = cache("after", [(-9.0, -11.0, -0.5, -2.0), (-12.0, -11.0, -0.5, -2.0), (-10.0, -10.0, -0.5, -2.0)])
    monkeypatch.setattr(logp, "compute_reference_logps", lambda *args, **kwargs: after)
    settings = {"average_logp": False, "loss": "sigmoid"}
    pairs = tmp_path / "pairs.json"
    assert course_preference.pairs_reward_accuracy(tmp_path, pairs, tmp_path, settings) == pytest.approx(1 / 3)
    assert course_preference.pairs_reward_accuracy(tmp_path, pairs, tmp_path, settings | {"loss": "ipo"}) == 1.0
