"""`mllm train grounding`: a config file and/or flags -> `mllm.train.grounding.train_grounding`."""

from __future__ import annotations

from mllm.cli.train_sft import run_training
from mllm.cli.training_options import parse_training_options
from mllm.train import grounding
from mllm.train.sft import ModelArguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_training_options(
        (ModelArguments, grounding.GroundingDataArguments, grounding.GroundingTrainingArguments), argv,
        "train grounding", "Visual-grounding fine-tuning (Shikra-format boxes) with Acc@0.5 evaluation.")
    return run_training("train grounding", grounding.train_grounding, arguments,
                        ("model_dir", "train_metrics", "eval_metrics", "grounding_eval"))
