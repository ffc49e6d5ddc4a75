"""`mllm train preference`: flags (or a .json / .yaml file of options) -> `mllm.train.preference.train`."""

from __future__ import annotations

from mllm.cli.train_sft import parse_dataclasses, run_training
from mllm.train import preference
from mllm.train.sft import ModelArguments


def parse_args(argv: list[str] | None = None):
    return parse_dataclasses((ModelArguments, preference.PreferenceDataArguments,
                              preference.PreferenceTrainingArguments), argv)


def main(argv: list[str] | None = None) -> int:
    return run_training("train preference", preference.train, parse_args(argv),
                        ("model_dir", "adapter_dir", "reference_path", "reward_curves", "train_metrics",
                         "final_metrics"))
