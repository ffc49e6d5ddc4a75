"""`mllm train grounding`: prepare REC files, two SFT steps, then Acc@0.5 on an eval REC file."""

from __future__ import annotations

import json

from PIL import Image

from mllm.cli import train_grounding


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
    code = train_grounding.main(["--model_name_or_path", str(tiny_checkpoint), "--rec", str(rec), "--eval_rec", str(rec),
                           "--eval_limit", "2", "--image_folder", str(tmp_path), "--tasks", "rec,reg",
                           "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
                           "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true"])
    assert code == 0
    assert len(json.loads((out / "grounding_train.json").read_text())) == 8
    assert (out / "config.json").is_file()
    assert json.loads((out / "grounding_eval" / "grounding.json").read_text())["overall"]["n"] == 2
    printed = capsys.readouterr().out
    assert '"grounding_eval"' in printed and "overall" in printed
