"""`mllm train grounding`: a config file and/or flags -> `mllm.train.grounding.train_grounding`."""

from __future__ import annotations

import json
import sys

from mllm.cli.train_sft import nothing_to_train
from mllm.cli.training_options import parse_training_options
from mllm.train import grounding
from mllm.train.sft import ModelArguments


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, training_args = parse_training_options(
        (ModelArguments, grounding.GroundingDataArguments, grounding.GroundingTrainingArguments), argv,
        "train grounding", "Visual-grounding fine-tuning (Shikra-format boxes) with Acc@0.5 evaluation.")
    if nothing_to_train(model_args):
        print(f"mllm train grounding: {nothing_to_train(model_args)}", file=sys.stderr)
        return 2
    result = grounding.train_grounding(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(json.dumps({k: result[k] for k in ("model_dir", "train_metrics", "eval_metrics", "grounding_eval")},
                         indent=2, default=str))
    return 0
