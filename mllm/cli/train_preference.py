"""`mllm train preference`: flags (or a .json / .yaml file of options) -> `mllm.train.preference.train`."""

from __future__ import annotations

import json
import sys

from mllm.cli.train_sft import configure_logging, parse_dataclasses
from mllm.train import preference
from mllm.train.sft import ModelArguments
from mllm.train.trainer import RunMismatchError


def parse_args(argv: list[str] | None = None):
    return parse_dataclasses((ModelArguments, preference.PreferenceDataArguments,
                              preference.PreferenceTrainingArguments), argv)


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, training_args = parse_args(argv)
    configure_logging(training_args)
    try:
        result = preference.train(model_args, data_args, training_args)
    except RunMismatchError as err:
        print(f"mllm train preference: {err}", file=sys.stderr)
        return 2
    if training_args.process_index == 0:
        summary = {k: result[k] for k in ("model_dir", "adapter_dir", "reference_path", "reward_curves",
                                          "train_metrics", "final_metrics")}
        print(json.dumps(summary, indent=2, default=str))
    return 0
