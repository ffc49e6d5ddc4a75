"""DeepSpeed for real: ZeRO-2 and ZeRO-3 with 2 processes on the CPU (DeepSpeed's CPU accelerator, gloo),
batch 2 per process, must follow the loss trajectory and end at the weights of 1 process with batch 4.

The shipped configs (configs/ds_zero2.json, ds_zero3.json) are used as they are; ZeRO-3's final save gathers the
partitioned weights into one model.safetensors, which is compared tensor by tensor.
"""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from mllm.train.sft import DataArguments, ModelArguments, SFTTrainingArguments, train
from tests.train.test_ddp import COMMON, ROOT, data, free_port, one_thread  # noqa: F401  (fixtures)

pytest.importorskip("deepspeed")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_processes_equal_one_process(stage, tiny_checkpoint, data, tmp_path):
    out = tmp_path / f"zero{stage}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "mllm.cli", "train", "sft",
           "--model_name_or_path", str(tiny_checkpoint), "--data_path", str(data / "train.json"),
           "--image_folder", str(data), "--output_dir", str(out), "--gradient_accumulation_steps", "1",
           "--ddp_backend", "gloo", "--deepspeed", str(ROOT / "configs" / f"ds_zero{stage}.json"), *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "DeepSpeed" in proc.stdout + proc.stderr  # the engine really ran
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    ds_losses = [h["loss"] for h in history if "loss" in h]

    reference = train(
        ModelArguments(str(tiny_checkpoint)),
        DataArguments(str(data / "train.json"), image_folder=str(data)),
        SFTTrainingArguments(output_dir=str(tmp_path / "single"), max_steps=3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=1, learning_rate=2e-3, logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0))
    losses = [h["loss"] for h in reference["log_history"] if "loss" in h]
    assert len(ds_losses) == len(losses) == 3
    assert ds_losses == pytest.approx(losses, abs=1e-4), (ds_losses, losses)
    assert losses[0] != pytest.approx(losses[2], abs=1e-2)  # the weights moved between steps
    ds_weights = load_file(str(out / "model.safetensors"))
    state = reference["model"].state_dict()
    assert set(ds_weights) == set(state)
    for name, tensor in state.items():
        assert (ds_weights[name].float() - tensor.float()).abs().max().item() < 1e-4, name
