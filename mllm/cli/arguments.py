"""Argument types shared by the verbs: values that make no sense are refused when the command line is parsed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text}") from None
    if not value >= 0 or value == float("inf"):  # NaN fails the first test
        raise argparse.ArgumentTypeError(f"must be a finite number, zero or more, got {text}")
    return value


def output_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file path")
    return path


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --attn and --adapter of the inference verbs (`mllm.model.loading`)."""
    group = parser.add_argument_group("where and how the model runs")
    group.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights and compute dtype; auto: bfloat16 on CUDA, float32 on the CPU")
    group.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                       help="attention kernel: sdpa (PyTorch's fused attention; flash kernels on CUDA), eager, or "
                            "flash_attention_2 (the flash-attn package, CUDA, bf16/fp16)")
    group.add_argument("--adapter", default=None,
                       help="a PEFT (LoRA) adapter folder merged into --model, e.g. a LoRA run's checkpoint-N")


def add_listen_arguments(parser: argparse.ArgumentParser, what: str, port: int, any_port: bool) -> None:
    """--model, --host and --port of a verb that serves a model over the network (`serve`, `web`): loopback by
    default, since neither has authentication."""
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped tiny model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help=f"address to listen on (default: loopback only; 0.0.0.0 exposes the {what} to the "
                             "network, which has no authentication)")
    parser.add_argument("--port", type=non_negative_int if any_port else positive_int, default=port,
                        help=f"port (default {port}{'; 0: any free one' if any_port else ''})")


def device_and_dtype(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, str]:
    """(`cuda:0`-style device, dtype name) of --device/--dtype; one that cannot be had, or an --attn this device
    and dtype cannot run, is a usage error."""
    import torch

    from mllm.model.loading import bf16_autocast_pays, check_attention, resolve_device_dtype

    try:
        device, dtype = resolve_device_dtype(args.device, args.dtype)
        check_attention(getattr(args, "attn", "sdpa"), device, dtype)
    except ValueError as err:
        parser.error(str(err))
    if device.type == "cpu" and dtype == torch.bfloat16 and not bf16_autocast_pays("cpu"):
        print(f"{parser.prog}: note: this CPU has no bf16 kernels; --dtype bfloat16 is emulated, several times "
              "slower than float32 here", file=sys.stderr)
    return str(device), str(dtype).removeprefix("torch.")


def runtime_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The `runtime` of the library's inference entry points (`mllm.eval.answer.run`'s device, dtype, attn,
    adapter) from the arguments `add_device_arguments` added."""
    device, dtype = device_and_dtype(parser, args)
    return {"device": device, "dtype": dtype, "attn": args.attn, "adapter": args.adapter}


def load_model(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(model, tokenizer, processor) of `--model` (default: the shipped one) on `--device` in `--dtype`; a device
    or dtype that cannot be had is a usage error."""
    from mllm.model.checkpoint import CheckpointError
    from mllm.model.loading import DTYPES, default_model_dir, load_pretrained

    device, dtype = device_and_dtype(parser, args)
    try:
        return load_pretrained(args.model or default_model_dir(), dtype=DTYPES[dtype], device=device,
                               attn_implementation=args.attn, adapter=args.adapter)
    except (FileNotFoundError, CheckpointError) as err:  # a missing model or adapter, a broken checkpoint
        parser.error(str(err))


def load_images(parser: argparse.ArgumentParser, paths) -> list:
    """The images at `paths` as RGB; an unreadable one is a usage error naming it."""
    from mllm.model.image_processing import load_image

    try:
        return [load_image(str(path)) for path in paths]
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
