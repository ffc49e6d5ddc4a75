"""`mllm train sft`: a config file and/or flags -> the typed dataclasses -> `mllm.train.sft.train`."""

from __future__ import annotations

import json
import logging
import sys

from mllm.cli.training_options import parse_training_options
from mllm.train import sft
from mllm.train.trainer import RunMismatchError


def parse_args(argv: list[str] | None = None):
    return parse_training_options((sft.ModelArguments, sft.DataArguments, sft.SFTTrainingArguments), argv,
                                  "train sft", "Supervised fine-tuning (assistant-only loss) of a checkpoint.")


def configure_logging(training_args) -> None:
    """INFO on the main process, WARNING on the others."""
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def nothing_to_train(model_args) -> str | None:
    """The refusal for flags that leave no parameter to train (all of --no_tune_vision, --no_tune_resampler and
    --no_tune_llm without LoRA), or None."""
    if not (model_args.tune_vision or model_args.tune_resampler or model_args.tune_llm or model_args.use_lora):
        return ("--no_tune_vision, --no_tune_resampler and --no_tune_llm together (without --use_lora) leave "
                "nothing to train; drop one of them")
    return None


def leave_process_group() -> None:
    """Destroy the torchrun process group before the interpreter exits. Left to the exit handlers, a gloo or
    DeepSpeed communication thread can still be running when its owner is destroyed, and the process then aborts
    ("terminate called without an active exception") after the run finished; this was seen once in CI under load."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_training(verb: str, train, arguments: tuple, summary_keys: tuple) -> int:
    """Refuse flags that train nothing, train, refuse another run's output_dir, print the summary."""
    model_args, data_args, training_args = arguments
    refusal = nothing_to_train(model_args)
    if refusal:
        print(f"mllm {verb}: {refusal}", file=sys.stderr)
        return 2
    configure_logging(training_args)
    try:
        result = train(model_args, data_args, training_args)
    except RunMismatchError as err:
        print(f"mllm {verb}: {err}", file=sys.stderr)
        return 2
    finally:
        leave_process_group()
    if training_args.process_index == 0:
        print(json.dumps({k: result[k] for k in summary_keys}, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_training("train sft", sft.train, parse_args(argv),
                        ("model_dir", "adapter_dir", "train_metrics", "eval_metrics"))
