"""`mllm course --stage grounding`: the time-capped cosine schedule and the stage's plumbing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import mllm.course.grounding as course_grounding


def test_cosine_to_deadline_by_steps_and_by_clock():
    from types import SimpleNamespace

    import torch

    clock = course_grounding.CosineToDeadline(minutes=10, warmup=0.1)
    clock.on_train_begin(SimpleNamespace(learning_rate=1e-3), None, None)
    assert clock.rate(0.05) == pytest.approx(5e-4)  # half-way through the warmup
    assert clock.rate(0.1) == pytest.approx(1e-3)
    assert clock.rate(0.55) == pytest.approx(5e-4)  # half-way through the cosine
    assert clock.rate(1.0) == pytest.approx(0.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state, control = SimpleNamespace(global_step=55, max_steps=100), SimpleNamespace(should_training_stop=False)
    clock.on_step_begin(None, state, control, optimizer=optimizer, lr_scheduler=constant)  # steps lead the clock
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    optimizer.step()
    constant.step()
    assert constant.get_last_lr() == [pytest.approx(5e-4)]  # what the Trainer logs
    clock.on_step_end(None, state, control)
    assert not control.should_training_stop
    clock.started -= 10 * 60  # the ten minutes are spent: stop, rate 0
    clock.on_step_end(None, state, control)
    assert control.should_training_stop and clock.stopped_at == 55
    clock.on_step_begin(None, state, control, optimizer=optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_course_stage_plumbing(tmp_path, tiny_checkpoint):
    """The stage on a 4-image world with the random checkpoint as its base: two training steps."""
    import shutil

    from mllm.course.grounding import course_stage
    from mllm.world.synth import generate

    with pytest.raises(FileNotFoundError, match="base"):
        course_stage(tmp_path, SimpleNamespace(), 0)
    generate(tmp_path / "world", n_train=4, n_test=2, seed=0, caption_noise=0.0, workers=1, progress=False)
    shutil.copytree(tiny_checkpoint, tmp_path / "base" / "model")
    budget = SimpleNamespace(grounding_steps=2, grounding_batch=2, eval_limit=2)
    result = course_stage(tmp_path, budget, 0)
    assert result["stage"] == "grounding" and result["settings"]["steps"] == 2
    assert result["before"]["n"] == 2 and result["after"]["n"] == 2
    assert 0.0 <= result["after"]["acc"] <= 1.0
    assert (tmp_path / "grounding" / "model" / "config.json").is_file()
    assert (tmp_path / "grounding" / "grounding_train.report.json").is_file()
    assert result["table_rows"][0].startswith("| grounding | Acc@0.5")
    assert result["pictures"]["after"][-1].endswith("contact_sheet.png")
