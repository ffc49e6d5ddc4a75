"""`mllm train sft` resumes only complete checkpoints of the same run, through the CLI, with real kills."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from test_answer_safety import mllm


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    records = []
    for i in range(8):
        image = Image.new("RGB", (56, 56), "white")
        yes = i % 2 == 0
        (ImageDraw.Draw(image).ellipse if yes else ImageDraw.Draw(image).rectangle)((8, 8, 44, 44), fill="red")
        image.save(root / f"{i}.png")
        records.append({"id": i, "image": f"{i}.png", "conversations": [
            {"role": "user", "content": "<image>\nIs there a red circle in the image? Please answer yes or no."},
            {"role": "assistant", "content": "Yes" if yes else "No"}]})
    (root / "train.json").write_text(json.dumps(records))
    return root


def sft_args(checkpoint, data, out, *extra):
    return ["train", "sft", "--model_name_or_path", str(checkpoint), "--data_path", str(data / "train.json"),
            "--image_folder", str(data), "--output_dir", str(out), "--max_steps", "6", "--save_strategy", "steps",
            "--save_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "linear", "--report_to", "none", "--logging_steps", "1", "--seed", "0",
            "--dataloader_num_workers", "0", "--yesno_eval_samples", "0", *extra]


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_an_incomplete_newest_checkpoint_is_skipped(tmp_path, tiny_checkpoint, sft_data):
    straight = tmp_path / "straight"
    assert mllm(*sft_args(tiny_checkpoint, sft_data, straight)) == 0
    out = tmp_path / "cut"
    assert mllm(*sft_args(tiny_checkpoint, sft_data, out)) == 0
    newest = out / "checkpoint-6"
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # a disk that filled up
    (out / "model.safetensors").unlink()
    assert mllm(*sft_args(tiny_checkpoint, sft_data, out, "--resume_from_checkpoint", "auto")) == 0
    assert same(weights(out), weights(straight))  # resumed from checkpoint-4 and reached the same weights


def test_another_run_in_the_same_output_dir_is_refused(tmp_path, tiny_checkpoint, sft_data, capsys):
    out = tmp_path / "run"
    assert mllm(*sft_args(tiny_checkpoint, sft_data, out)) == 0
    first = weights(out)
    other = sft_args(tiny_checkpoint, sft_data, out, "--resume_from_checkpoint", "auto", "--learning_rate", "5e-4")
    assert mllm(*other) != 0
    assert "holds another run (different learning_rate)" in capsys.readouterr().err
    assert same(weights(out), first)
    assert mllm(*other, "--overwrite_output_dir") == 0
    assert not same(weights(out), first)


def run_killed(command, out, when) -> None:
    """Start `command`, kill -9 its whole process group once `when(out)` holds (or after 240 s)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not when(out):
        time.sleep(0.005)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.parametrize("moment", ["mid_checkpoint_write", "between_checkpoints"])
def test_kill_minus_9_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_checkpoint, sft_data, moment):
    straight = tmp_path / "straight"
    assert mllm(*sft_args(tiny_checkpoint, sft_data, straight)) == 0
    out = tmp_path / "killed"
    command = [sys.executable, "-c", "import sys; from mllm.cli.main import main; sys.exit(main(sys.argv[1:]))",
               *sft_args(tiny_checkpoint, sft_data, out)]

    def writing_checkpoint_4(folder):  # the folder exists but the Trainer has not finished (marked) it
        return (folder / "checkpoint-4").is_dir() and not (folder / "checkpoint-4" / "checkpoint_complete.json").exists()

    def after_checkpoint_2(folder):
        return (folder / "checkpoint-2" / "checkpoint_complete.json").exists()

    run_killed(command, out, writing_checkpoint_4 if moment == "mid_checkpoint_write" else after_checkpoint_2)
    assert not (out / "model.safetensors").exists(), "the run must be killed before it finished"
    assert mllm(*sft_args(tiny_checkpoint, sft_data, out, "--resume_from_checkpoint", "auto")) == 0
    assert same(weights(out), weights(straight))
