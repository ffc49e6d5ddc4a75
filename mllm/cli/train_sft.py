"""`mllm train sft`: a config file and/or flags -> the typed dataclasses -> `mllm.train.sft.train`."""

from __future__ import annotations

import json
import logging
import os
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


def slow_bf16_note(training_args) -> str | None:
    """A note for --bf16 on a CPU without bf16 kernels (AVX2 alone: autocast emulates them; a matrix product ran 55x
    and a base-recipe training step 18x slower than in float32, measured), or None. A note, not a refusal: the
    numbers of a bf16 run may be what the user wants."""
    import torch

    from mllm.model.loading import bf16_autocast_pays

    on_cpu = getattr(training_args, "use_cpu", False) or not torch.cuda.is_available()
    if getattr(training_args, "bf16", False) and on_cpu and not bf16_autocast_pays("cpu"):
        return ("note: --bf16 on this CPU, which has no bf16 kernels: autocast emulates them, several times "
                "slower than float32 (drop --bf16 to train in float32)")
    return None


def leave_process_group() -> bool:
    """Destroy the torchrun process group (if this process is in one) while the interpreter is fully alive;
    returns whether it was in one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def exit_distributed_worker(code: int) -> None:
    """End a launched worker (torchrun, deepspeed) without the interpreter's finalization. Gloo's worker threads
    outlive `destroy_process_group` (DeepSpeed's engine and every ZeRO-3 parameter keep the groups alive), and a
    thread that releases a finished collective's tensors needs the GIL; if that happens once finalization has
    begun, Python ends the thread from inside a C++ destructor and the process aborts ("terminate called without
    an active exception", SIGABRT) after a finished run. Measured: `tests/train/test_deepspeed.py`'s ZeRO-3 run
    aborted so in 3 of 19 runs on a loaded 2-core machine, in 0 of 30 with this exit (gdb: `~AsyncAllgatherWork`
    -> `decref_pyobject` -> `take_gil` -> `PyThread_exit_thread`). Everything the run writes is already on disk;
    only the streams and the log handlers are flushed here."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_training(verb: str, train, arguments: tuple, summary_keys: tuple) -> int:
    """Refuse flags that train nothing, train, refuse another run's output_dir, print the summary. A launched
    worker ends here (`exit_distributed_worker`) instead of returning."""
    model_args, data_args, training_args = arguments
    refusal = nothing_to_train(model_args)
    if refusal:
        print(f"mllm {verb}: {refusal}", file=sys.stderr)
        return 2
    configure_logging(training_args)
    note = slow_bf16_note(training_args)
    if note and getattr(training_args, "process_index", 0) == 0:
        print(f"mllm {verb}: {note}", file=sys.stderr, flush=True)
    code, distributed = 0, False
    try:
        result = train(model_args, data_args, training_args)
        if training_args.process_index == 0:
            print(json.dumps({k: result[k] for k in summary_keys}, indent=2, default=str))
    except RunMismatchError as err:
        print(f"mllm {verb}: {err}", file=sys.stderr)
        code = 2
    finally:
        distributed = leave_process_group()
    if distributed and "LOCAL_RANK" in os.environ:  # a launched worker (torchrun, deepspeed), not a caller's process
        exit_distributed_worker(code)
    return code


def main(argv: list[str] | None = None) -> int:
    return run_training("train sft", sft.train, parse_args(argv),
                        ("model_dir", "adapter_dir", "train_metrics", "eval_metrics"))
