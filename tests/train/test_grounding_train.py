"""`mllm train grounding`: prepare REC files, two SFT steps, then Acc@0.5 on an eval REC file."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mllm.train import grounding


def test_cli_prepares_trains_and_scores(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "imgs").mkdir()
    lines = []
    for i in range(4):
        Image.new("RGB", (56, 42), (60 * i, 100, 50)).save(tmp_path / "imgs" / f"{i}.png")
        lines.append(json.dumps({"img_path": f"imgs/{i}.png", "expression": f"the blue star {i}",
                                 "bbox": [4, 4, 30, 30], "width": 56, "height": 42}))
    rec = tmp_path / "rec.jsonl"
    rec.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    code = grounding.main(["--model_name_or_path", str(tiny_checkpoint), "--rec", str(rec), "--eval_rec", str(rec),
                           "--eval_limit", "2", "--image_folder", str(tmp_path), "--tasks", "rec,reg",
                           "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
                           "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true"])
    assert code == 0
    assert len(json.loads((out / "grounding_train.json").read_text())) == 8
    assert (out / "config.json").is_file()
    assert json.loads((out / "grounding_eval" / "grounding.json").read_text())["overall"]["n"] == 2
    printed = capsys.readouterr().out
    assert '"grounding_eval"' in printed and "overall" in printed


def test_cosine_to_deadline_by_steps_and_by_clock():
    from types import SimpleNamespace

    import torch

    clock = grounding.CosineToDeadline(minutes=10, warmup=0.1)
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
