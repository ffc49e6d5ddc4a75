"""Every shipped DeepSpeed config: valid JSON, no optimizer / scheduler block (a DeepSpeed `scheduler` silently
overrides `--lr_scheduler_type`, training_anchors §3 #1), "auto" wherever the HF Trainer decides.

The hidden-size-based bucket sizes are integers (MiniCPM-V 2.6: hidden 3584 -> reduce_bucket_size 3584**2,
prefetch 0.9 * 3584**2, persistence threshold 10 * 3584, the values HF's "auto" would give): HF fills "auto"
there from `model.config.hidden_size`, which the nested MLLMConfig does not have at the top level.
"""

import json
from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("ds_*.json"))
AUTO_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping")


def all_keys(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from all_keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from all_keys(value)


def test_both_stages_are_shipped():
    assert {p.name for p in CONFIGS} >= {"ds_zero2.json", "ds_zero3.json"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_leaves_schedule_and_sizes_to_the_trainer(path):
    config = json.loads(path.read_text())
    keys = set(all_keys(config))
    assert "optimizer" not in keys and "scheduler" not in keys
    for key in AUTO_KEYS:
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    stage = int(path.stem.removeprefix("ds_zero"))
    assert config["zero_optimization"]["stage"] == stage
    if stage == 3:  # the final save gathers the partitioned weights into one state dict
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_hf_resolves_every_auto_for_our_model(path):
    pytest.importorskip("deepspeed")  # the integration refuses to load without it
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from mllm.model.modeling_mllm import MLLMModel
    from mllm.train.sft import SFTTrainingArguments

    args = SFTTrainingArguments(output_dir="unused", report_to="none", per_device_train_batch_size=2,
                                gradient_accumulation_steps=3, max_grad_norm=0.7)
    config = HfTrainerDeepSpeedConfig(str(path))
    config.trainer_config_process(args)
    config.trainer_config_finalize(args, MLLMModel.from_config("tiny"), num_training_steps=10)
    assert "auto" not in json.dumps(config.config)
    assert config.config["gradient_accumulation_steps"] == 3 and config.config["gradient_clipping"] == 0.7
    assert "scheduler" not in config.config and "optimizer" not in config.config
