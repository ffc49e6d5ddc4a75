"""`mllm train sft`: flags (or a .json / .yaml file of options) -> the typed dataclasses -> `mllm.train.sft.train`."""

from __future__ import annotations

import json
import logging
import sys

from transformers import HfArgumentParser

from mllm.train import sft
from mllm.train.trainer import RunMismatchError


def parse_dataclasses(types: tuple, argv: list[str] | None = None, yaml: bool = True):
    """Typed arguments from flags, or from a single .json (or, with `yaml`, .yaml) file of options."""
    parser = HfArgumentParser(types)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    if yaml and len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def parse_args(argv: list[str] | None = None):
    return parse_dataclasses((sft.ModelArguments, sft.DataArguments, sft.SFTTrainingArguments), argv)


def configure_logging(training_args) -> None:
    """INFO on the main process, WARNING on the others."""
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, training_args = parse_args(argv)
    configure_logging(training_args)
    try:
        result = sft.train(model_args, data_args, training_args)
    except RunMismatchError as err:
        print(f"mllm train sft: {err}", file=sys.stderr)
        return 2
    if training_args.process_index == 0:
        summary = {"model_dir": result["model_dir"], "adapter_dir": result["adapter_dir"],
                   "train_metrics": result["train_metrics"], "eval_metrics": result["eval_metrics"]}
        print(json.dumps(summary, indent=2, default=str))
    return 0
