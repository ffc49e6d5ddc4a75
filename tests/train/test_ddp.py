"""Data parallelism == gradient accumulation: `torchrun --nproc_per_node 2` on CPU (gloo), batch 2 per process,
must follow the same loss trajectory (and end at the same weights) as 1 process, batch 2, accumulation 2.

Both also equal 1 process with one batch of 4. The samples have different numbers of target tokens, so that
last equality only holds because the loss is normalised by the token count of the whole optimizer step
(`num_items_in_batch`, see mllm/train/trainer.py): a mean of micro-batch means would still make DDP match
accumulation, but neither would match the batch of 4.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from mllm.train.sft import DataArguments, ModelArguments, SFTTrainingArguments, train

QUESTION = "Is there a purple triangle in the image? Please answer yes or no."
ANSWERS = ["Yes", "There are 2 objects: a red circle and an orange cross.", "No", "a red circle and a blue square.",
           "No", "Yes", "a green star on the left and a yellow heart.", "the top left corner"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Other processes share this machine's 2 cores; two OpenMP threads then stall each other at every barrier
    (measured ~30x slower per step), one thread does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def data(tmp_path):
    (tmp_path / "img").mkdir()
    records = []
    for i, answer in enumerate(ANSWERS):
        image = Image.new("RGB", (56 + 14 * (i % 3), 56), "white")
        ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=("red", "blue", "green")[i % 3])
        image.save(tmp_path / "img" / f"{i}.png")
        records.append({"id": i, "image": f"img/{i}.png", "conversations": [
            {"role": "user", "content": f"<image>\n{QUESTION}"}, {"role": "assistant", "content": answer}]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    return tmp_path


COMMON = ["--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "2e-3",
          "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
          "--disable_tqdm", "true", "--seed", "0", "--dataloader_num_workers", "0"]


def test_two_processes_equal_one_process_with_accumulation(tiny_checkpoint, data, tmp_path):
    out_ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "mllm.cli", "train", "sft",
           "--model_name_or_path", str(tiny_checkpoint), "--data_path", str(data / "train.json"),
           "--image_folder", str(data), "--output_dir", str(out_ddp), "--gradient_accumulation_steps", "1",
           "--ddp_backend", "gloo", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ddp_history = json.loads((out_ddp / "trainer_state.json").read_text())["log_history"]

    def single(batch_size, accumulation):
        return train(
            ModelArguments(str(tiny_checkpoint)),
            DataArguments(str(data / "train.json"), image_folder=str(data)),
            SFTTrainingArguments(output_dir=str(tmp_path / f"single{accumulation}"), max_steps=3,
                                 per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                 learning_rate=2e-3, logging_steps=1, save_strategy="no", report_to="none",
                                 use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0))

    accumulated, whole = single(2, 2), single(4, 1)
    ddp_losses = [h["loss"] for h in ddp_history if "loss" in h]
    for other in (accumulated, whole):
        losses = [h["loss"] for h in other["log_history"] if "loss" in h]
        assert len(losses) == len(ddp_losses) == 3
        assert ddp_losses == pytest.approx(losses, abs=1e-4), (ddp_losses, losses)
    ddp_weights = load_file(str(out_ddp / "model.safetensors"))
    for other in (accumulated, whole):
        for name, tensor in other["model"].state_dict().items():
            assert (ddp_weights[name] - tensor).abs().max().item() < 1e-4, name
