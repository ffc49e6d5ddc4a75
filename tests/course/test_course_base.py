"""The base recipe end to end on a tiny world: vision pretraining, read, settle, ground, align, tune and a polish
round, evaluations, and a second run that resumes instead of training again (every finished phase is reused, the
model is the same)."""

import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from mllm.course.base import GROUND_MIX, SLOT_GRID, base_stages, stage_base
from mllm.course.shared import Budget, world_dir


def _budget():
    return Budget(n_train=8, n_test=4, vision_pretrain_steps=3, vision_pretrain_batch=4, read_steps=4, settle_steps=2,
                  ground_steps=2, align_steps=2, tune_steps=2, base_batch=2,
                  base_eval_scenes=3, base_eval_every=2, base_ground_scenes=2, base_save_every=2, eval_limit=4,
                  polish_rounds=1, polish_images=3, polish_steps=2)


def test_base_recipe_runs_and_a_rerun_resumes(tmp_path):
    first = stage_base(tmp_path, _budget(), seed=0)
    base = tmp_path / "base"
    assert first["vision_pretrain"]["step"] == 3
    names = ["read", "settle", "ground", "align", "tune"]
    assert [s["stage"] for s in first["stages"]] == names
    assert [s["steps"] for s in first["stages"]] == [4, 2, 2, 2, 2]
    settings = [s["settings"] for s in first["stages"]]
    # every stage puts the image after the first question; all but align (no LLM trained) train the match head
    assert all(s["question_first"] for s in settings)
    assert [s["match_weight"] for s in settings] == [1.0, 1.0, 1.0, 0.0, 1.0]
    # the budget's pointer weight goes to the stages that write descriptions (read writes none): off by default
    assert [s["pointer_weight"] for s in settings] == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert [s.pointer_weight for s in base_stages(Budget(pointer_weight=1.0))] == [0.0, 1.0, 1.0, 0.0, 1.0]
    wired = base_stages(Budget(pointer_weight=1.0, pointer_boxes=True, pointer_attention=True, read_weight=0.5))
    assert [(s.pointer_boxes, s.pointer_attention, s.read_weight) for s in wired] == [
        (False, False, 0.0), (True, True, 0.5), (True, True, 0.5), (False, False, 0.0), (True, True, 0.5)]
    # the box: whole-number tokens on the number code, role heads where grounding answers are written (settle,
    # ground, tune), and the code read back from the image tokens where the stages see pixels (align, tune)
    assert [s["box_role_weight"] for s in settings] == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert [s["box_readout_weight"] for s in settings] == [0.0, 0.0, 0.0, 0.25, 0.25]
    read, settle = settings[0]["mix"], settings[1]["mix"]
    # read: yes/no questions of every kind and the statements turn, nothing else; settle: the full mix, slots frozen
    assert read["yesno"] == 1.0 and read["yesno_kinds"] is None and read["statements"] and settings[0]["turns"] == 2
    assert read["lookup"] == read["short"] == read["detailed"] == read["grounding"] == 0.0
    assert settle["detailed"] > 0 and settle["grounding"] > 0 and settle["lookup"] > 0 and settle["alone"] > 0
    assert set(settings[0]["trains"]) == {"llm", "slots"} and set(settings[1]["trains"]) == set(settings[2]["trains"]) \
        == {"llm"}
    assert all(0.0 <= s["describe"] <= 1.0 for s in first["stages"])  # greedy descriptions scored at the end
    assert all(set(s["ground"]) == {"acc", "iou", "parsed"} for s in first["stages"])  # and greedy boxes
    for kind in names:
        curve = json.loads((base / kind / "log.json").read_text())
        assert [e["step"] for e in curve if "yesno" in e] == ([2, 4] if kind == "read" else [2])
        assert [e["step"] for e in curve if "describe" in e] == [e["step"] for e in curve if "yesno" in e]
        assert [e["step"] for e in curve if "ground" in e] == [e["step"] for e in curve if "yesno" in e]
        assert not (base / kind / "state.pt").exists()  # a finished stage keeps its model, not its optimiser
    assert (base / "base_curves.png").stat().st_size > 0
    config = json.loads((base / "model" / "config.json").read_text())
    assert config["query_num"] == SLOT_GRID ** 2 and config["use_image_id"] is False
    assert config["slice_config"]["max_slice_nums"] == 1 and config["question_first"] is True
    assert config["resampler_positions"] == "relative"  # each query's cell at the same keys on every image shape
    assert set(first["chair"]) == {"CHAIRs", "CHAIRi", "Recall", "Len", "Echo"} and first["yesno"]["n_questions"] == 4
    minutes = first["vision_pretrain"]["cpu_minutes"] + sum(s["cpu_minutes"] for s in first["stages"])
    assert first["polish"]["rounds"] == 1 and first["polish"]["cpu_minutes"] > 0
    assert first["train_cpu_minutes"] == round(minutes + first["polish"]["cpu_minutes"], 1)
    weights = load_file(base / "model" / "model.safetensors")
    # the base is scored from the last round's own answers (the same weights), not answered again
    for name in ("bench_answers_greedy.jsonl", "yesno_answers.jsonl", "rec_answers.jsonl"):
        assert (base / name).read_text() == (base / "polish" / "round1" / "eval" / name).read_text()
    # the base is the last polish round's model, which went on from tune's
    polished = load_file(base / "polish" / "round1" / "model" / "model.safetensors")
    assert all(bool((weights[k] == polished[k]).all()) for k in weights)
    tuned = load_file(base / "tune" / "model" / "model.safetensors")
    assert any(not bool((tuned[k] == weights[k]).all()) for k in tuned if k.startswith("llm."))

    # the tuned stage's weights differ from the read stages' in the LLM and the vision side; each read-kind stage
    # goes on from the one before it and changes the LLM
    chain = [load_file(base / name / "model" / "model.safetensors") for name in names[:3]]
    for before, after in zip(chain, chain[1:]):
        assert any(not bool((before[k] == after[k]).all()) for k in after if k.startswith("llm."))
    last_read = chain[-1]  # ground's
    align = load_file(base / "align" / "model" / "model.safetensors")
    assert any(not bool((last_read[k] == align[k]).all()) for k in last_read if k.startswith("vpm."))
    assert all(bool((last_read[k] == align[k]).all()) for k in last_read if k.startswith("llm."))  # frozen: aligning
    assert any(not bool((align[k] == weights[k]).all()) for k in align if k.startswith("llm."))

    second = stage_base(tmp_path, _budget(), seed=0)
    again = load_file(base / "model" / "model.safetensors")
    assert all(bool((weights[k] == again[k]).all()) for k in weights)
    assert second["stages"] == first["stages"] and second["chair"] == first["chair"]
    assert second["polish"] == first["polish"]  # the finished round reused


def test_the_course_table_says_when_its_numbers_are_a_smoke_run():
    from mllm.course.runner import table

    base = {"chair": {"CHAIRs": 0.1, "CHAIRi": 0.05, "Recall": 0.7, "Len": 40.0},
            "yesno": {"acc": 0.9, "acc_plus": 0.8}}
    assert "Smoke run" not in table({"base": base | {"smoke_test": False}})
    note = table({"base": base | {"smoke_test": True}}).splitlines()[-1]
    assert note.startswith("Smoke run (`--quick`) for base") and "not the course's" in note
    assert Budget.quick().smoke_test and not Budget().smoke_test


def test_stages_run_side_by_side_keep_each_others_results(tmp_path, monkeypatch):
    import json

    from mllm.course import runner

    def sft(out, budget, seed):
        # another `mllm course --stage grounding` process finishes while this stage trains
        (out / "results.json").write_text(json.dumps({"grounding": {"accuracy": 0.5}}))
        return {"stage": "sft", "before": {"test_loss": 0.7, "acc": 0.5}, "after": {"test_loss": 0.1, "acc": 0.9}}

    monkeypatch.setitem(runner.RUNNERS, "sft", sft)
    results = runner.run(tmp_path, "sft", Budget.quick())
    assert set(results) == {"grounding", "sft"}
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert not list(tmp_path.glob("*.tmp"))


def test_read_beside_the_vision_pretraining_gives_the_serial_base(tmp_path, monkeypatch):
    from mllm.course import base as course_base

    read_beside = course_base._read_beside
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    side_by_side = stage_base(tmp_path / "two", _budget(), seed=0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    calls = []
    monkeypatch.setattr(course_base, "_read_beside", lambda *a: calls.append(a))
    serial = stage_base(tmp_path / "one", _budget(), seed=0)
    assert calls == []  # one core: no process beside
    two = load_file(tmp_path / "two" / "base" / "model" / "model.safetensors")
    one = load_file(tmp_path / "one" / "base" / "model" / "model.safetensors")
    assert all(torch.allclose(two[k], one[k], atol=1e-5) for k in one)
    # each read-kind stage ran beside phase 0 from the init's vision, or (once phase 0 ended) here from phase 0's;
    # neither vision was handed on to align (the bases are equal)
    init = load_file(tmp_path / "two" / "base" / "init" / "model.safetensors")
    phase0 = load_file(tmp_path / "two" / "base" / "phase0" / "model.safetensors")
    key = "vpm.embeddings.patch_embedding.weight"
    assert not torch.equal(init[key], phase0[key])
    for name in ("read", "settle", "ground"):
        read = load_file(tmp_path / "two" / "base" / name / "model" / "model.safetensors")
        assert torch.equal(read[key], init[key]) or torch.equal(read[key], phase0[key])
    assert [s["steps"] for s in side_by_side["stages"]] == [s["steps"] for s in serial["stages"]]
    assert side_by_side["stages"][0]["steps"] == 4  # read

    # phase 0 ends while read is at step 3 of 4: read stops there (saved), and the stages go on here from that step
    class SetOnItsThirdAsking:  # stands for the Event phase 0 sets: asked before each stage and after each step
        asked = 0

        def is_set(self):
            self.asked += 1
            return self.asked > 3

    threads = torch.get_num_threads()
    world_dir(tmp_path / "handed", _budget(), 0)
    read_beside(tmp_path / "handed", _budget(), 0, SetOnItsThirdAsking())
    torch.set_num_threads(threads)
    stopped = torch.load(tmp_path / "handed" / "base" / "read" / "state.pt", weights_only=True)
    assert stopped["step"] == 3 and not (tmp_path / "handed" / "base" / "settle").exists()
    handed = stage_base(tmp_path / "handed", _budget(), seed=0)
    assert [s["steps"] for s in handed["stages"]] == [s["steps"] for s in serial["stages"]]
    taken_over = load_file(tmp_path / "handed" / "base" / "model" / "model.safetensors")
    assert all(torch.allclose(taken_over[k], one[k], atol=1e-5) for k in one)
    read = load_file(tmp_path / "handed" / "base" / "read" / "model" / "model.safetensors")
    assert torch.equal(read[key], load_file(tmp_path / "handed" / "base" / "phase0" / "model.safetensors")[key])


def test_alignment_starts_from_a_fresh_resampler(tmp_path, monkeypatch):
    from mllm.course import base as course_base
    from mllm.model.modeling_mllm import MLLMModel

    seen = []
    fresh = course_base._fresh_resampler

    def spy(model, seed):
        before = {k: v.clone() for k, v in model.resampler.state_dict().items()}
        fresh(model, seed)
        seen.append((before, {k: v.clone() for k, v in model.resampler.state_dict().items()}))

    monkeypatch.setattr(course_base, "_fresh_resampler", spy)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    stage_base(tmp_path, _budget(), seed=0)
    assert len(seen) == 1
    before, after = seen[0]
    phase0 = load_file(tmp_path / "base" / "phase0" / "model.safetensors")
    assert all(torch.equal(before[k], phase0["resampler." + k]) for k in before)  # phase 0's, then replaced
    assert any(not torch.equal(before[k], after[k]) for k in before)
    config = MLLMModel.from_pretrained(tmp_path / "base" / "phase0").config
    torch.manual_seed(0)
    reference = MLLMModel(config).resampler.state_dict()
    assert all(torch.equal(after[k], reference[k]) for k in after)


def test_a_stopped_run_stops_the_stages_beside_it(tmp_path, monkeypatch):
    """Phase 0 fails (or is interrupted) while the read-kind stages train beside it: they stop too, rather than
    train on unseen into the run's folder."""
    from multiprocessing.context import SpawnProcess

    from mllm.course import base as course_base

    started = []
    real_start = SpawnProcess.start

    def start(process):
        real_start(process)
        started.append(process)

    monkeypatch.setattr(SpawnProcess, "start", start)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(course_base, "vision_phase", interrupted)
    budget = _budget()
    budget.read_steps = 10_000  # the reader would train for a long while
    try:
        stage_base(tmp_path, budget, seed=0)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interruption was swallowed")
    assert len(started) == 1 and not started[0].is_alive() and started[0].exitcode is not None


def test_whole_numbers_start_from_phase_rows_and_a_run_keeps_its_kind_of_tokenizer(tmp_path):
    import pytest

    from mllm.course.base import _fresh_model
    from mllm.course.shared import world_dir

    world = world_dir(tmp_path, _budget(), seed=0)
    model, tokenizer = _fresh_model(world, tmp_path / "init", 0, whole_numbers=True)
    assert tokenizer.tokenize("[87,123") == ["[", "87", ",", "123"]
    ids = [tokenizer.convert_tokens_to_ids(str(n)) for n in range(1000)]
    for weight in (model.llm.get_input_embeddings().weight, model.llm.lm_head.weight):
        rows = torch.nn.functional.normalize(weight[ids].detach(), dim=1)
        neighbours, far = (rows[:-1] * rows[1:]).sum(1), (rows[:-250] * rows[250:]).sum(1)
        assert neighbours.mean() > 0.9 and far.mean() < 0.5  # near numbers start near each other
        others = [i for i in range(len(tokenizer)) if i not in set(ids)]
        norms = weight.detach().norm(dim=1)
        assert float(norms[ids].mean()) == pytest.approx(float(norms[others].mean()), rel=0.05)
    reloaded, _ = _fresh_model(world, tmp_path / "init", 0, whole_numbers=True)  # reused as it is
    assert torch.equal(reloaded.llm.lm_head.weight, model.llm.lm_head.weight)
    with pytest.raises(ValueError, match="has whole-number tokens, but the budget asks for digits"):
        _fresh_model(world, tmp_path / "init", 0, whole_numbers=False)
    coded, _ = _fresh_model(world, tmp_path / "coded", 0, whole_numbers=True, box_code="number")
    from mllm.train.scene_slots import number_code

    from mllm.course.base import NUMBER_CODE_ROW_NORM

    rows = coded.llm.lm_head.weight[ids].detach()  # the LM head writes the slots' code, at a trained row's norm
    assert torch.allclose(rows, NUMBER_CODE_ROW_NORM * number_code(rows.shape[1], seed=0), atol=1e-5)
    others = [i for i in range(len(tokenizer)) if i not in set(ids)]
    assert float(rows.norm(dim=1).mean()) > 5 * float(coded.llm.lm_head.weight[others].detach().norm(dim=1).mean())
    assert torch.equal(coded.llm.get_input_embeddings().weight, model.llm.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="on the number code, but the budget asks for box_code='bins'"):
        _fresh_model(world, tmp_path / "coded", 0, whole_numbers=True)  # a run keeps its kind of number rows
    with pytest.raises(ValueError, match="off the number code, but the budget asks for box_code='number'"):
        _fresh_model(world, tmp_path / "init", 0, whole_numbers=True, box_code="number")
    with pytest.raises(ValueError, match="needs whole_numbers=True"):
        _fresh_model(world, tmp_path / "digits", 0, box_code="number")
    read_back = base_stages(Budget(box_readout_weight=0.1, ground_steps=0))
    assert [s.box_readout_weight for s in read_back] == [0.0, 0.0, 0.1, 0.1]  # the stages that see pixels
    wired = base_stages(Budget(box_role_weight=0.5, ground_steps=0))
    assert [s.box_role_weight for s in wired] == [0.0, 0.5, 0.0, 0.5]  # the stages that write grounding answers


def test_the_ground_phase_comes_after_settle_only_when_asked_for():
    grounded = base_stages(Budget(whole_numbers=True, box_role_weight=1.0, ground_steps=7, ground_lr=2e-4))
    assert [s.label for s in grounded] == ["read", "settle", "ground", "align", "tune"]
    ground = grounded[2]
    assert (ground.kind, ground.steps, ground.lr, ground.turns, ground.box_role_weight) == ("read", 7, 2e-4, 8, 1.0)
    assert ground.trains == {"llm": 1.0} and ground.mix.grounding > ground.mix.yesno > 0
    assert ground.mix.alone > 0  # grounding questions asked first, as evaluations ask them (without: none parsed)
    # without a ground phase (ground_steps=0) its settings change nothing: the other stages' fingerprints stay
    assert [s.label for s in base_stages(Budget(ground_steps=0))] == ["read", "settle", "align", "tune"]
    assert base_stages(Budget(ground_steps=0)) == base_stages(Budget(ground_steps=0, ground_lr=1.0, ground_turns=3,
                                                                     ground_describe=0.0))
    assert base_stages(Budget())[2].mix == GROUND_MIX  # the default: descriptions among ground's lone turns
    assert GROUND_MIX.detailed > 0 and base_stages(Budget(ground_describe=0.0))[2].mix.detailed == 0.0


def test_recount_takes_the_count_word_out_of_the_slots_from_there_on():
    from mllm.train.base_recipe import chain_fingerprint

    default = base_stages(Budget())
    assert all(s.slot_counts for s in default)  # no recount by default: the count word in every stage's slots
    counted = base_stages(Budget(recount_steps=7, recount_lr=2e-4, ground_steps=9))
    assert [s.label for s in counted] == ["read", "settle", "ground", "recount", "reground", "align", "tune"]
    recount, reground = counted[3], counted[4]
    assert (recount.kind, recount.steps, recount.lr, recount.trains, recount.turns) == ("read", 7, 2e-4,
                                                                                         {"llm": 1.0}, 2)
    assert recount.mix == counted[0].mix  # read's questions and statements
    assert (reground.steps, reground.mix, reground.trains) == (9, counted[2].mix, {"llm": 1.0})
    assert [s.slot_counts for s in counted] == [True, True, True, False, False, False, False]
    assert reground.interleave == ()  # by default ground's conversations alone
    mixed = base_stages(Budget(recount_steps=7, recount_lr=2e-4, ground_steps=9, reground_steps=12,
                               reground_recount_every=3))
    assert mixed[:4] == counted[:4] and mixed[5:] == counted[5:]
    ground_lesson = (counted[2].mix, counted[2].turns)
    assert (mixed[4].steps, mixed[4].interleave) == (12, (ground_lesson, ground_lesson, (recount.mix, 2)))
    with pytest.raises(ValueError, match="reground_recount_every"):
        base_stages(Budget(recount_steps=7, reground_recount_every=1))
    # tune may take recount's batches too, from pixels: every k-th step
    tuned = base_stages(Budget(recount_steps=7, recount_lr=2e-4, ground_steps=9, tune_recount_every=2))
    assert tuned[:6] == counted[:6] and tuned[6] == replace(counted[6], interleave=(
        (counted[6].mix, counted[6].turns), (recount.mix, 2)))
    no_ground = base_stages(Budget(recount_steps=7, ground_steps=0, tune_recount_every=3))
    assert [s.label for s in no_ground] == ["read", "settle", "recount", "reground", "align", "tune"]
    assert no_ground[-1].interleave[-1] == (recount.mix, 2) and len(no_ground[-1].interleave) == 3
    with pytest.raises(ValueError, match="tune_recount_every"):
        base_stages(Budget(recount_steps=7, tune_recount_every=1))
    with pytest.raises(ValueError, match="needs recount_steps"):
        base_stages(Budget(tune_recount_every=2))
    # the field at its default is not hashed: stages finished before it existed keep their fingerprints
    assert chain_fingerprint(default) == chain_fingerprint([replace(s, slot_counts=True) for s in default])
    assert chain_fingerprint(default[:1]) != chain_fingerprint([replace(default[0], slot_counts=False)])


def test_a_finished_phase0_is_reused_only_for_its_own_settings(tmp_path):
    """Its settings are recorded beside it; asked with others (the centre head on, another step count) it refuses,
    naming the field. One finished before settings were recorded counts as trained without the centre head."""
    import json

    import pytest

    from mllm.course.base import _check_phase0

    wanted = {"steps": 3000, "batch": 64, "lr": 0.003, "centre": 0.0, "seed": 0}
    _check_phase0(tmp_path, wanted)  # nothing recorded: the centre head off is what it was trained with
    with pytest.raises(ValueError, match="centre: finished with 0.0, asked 1.0"):
        _check_phase0(tmp_path, wanted | {"centre": 1.0})
    (tmp_path / "settings.json").write_text(json.dumps(wanted | {"centre": 1.0}))
    _check_phase0(tmp_path, wanted | {"centre": 1.0})
    with pytest.raises(ValueError, match=r"settings.json.*steps: finished with 3000, asked 100"):
        _check_phase0(tmp_path, wanted | {"centre": 1.0, "steps": 100})
