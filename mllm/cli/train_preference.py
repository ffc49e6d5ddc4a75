"""`mllm train preference`: a config file and/or flags -> `mllm.train.preference.train`."""

from __future__ import annotations

from mllm.cli.train_sft import run_training
from mllm.cli.training_options import parse_training_options
from mllm.train import preference
from mllm.train.sft import ModelArguments


def parse_args(argv: list[str] | None = None):
    return parse_training_options((ModelArguments, preference.PreferenceDataArguments,
                                   preference.PreferenceTrainingArguments), argv, "train preference",
                                  "Preference alignment (DPO family) against reference log-probs, computed "
                                  "first when their cache is absent.")


def main(argv: list[str] | None = None) -> int:
    return run_training("train preference", preference.train, parse_args(argv),
                        ("model_dir", "adapter_dir", "reference_path", "reward_curves", "train_metrics",
                         "final_metrics"))
