"""Load everything inference needs from one checkpoint folder: model, tokenizer, processor."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

from mllm.model.checkpoint import resolve_model_dir
from mllm.model.cpu_linear import cpu_matmul_layout, onednn_bf16_kernels, pack_linears
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.processing import processor_for
from mllm.model.tokenization import load_tokenizer

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-base"


def default_model_dir() -> Path:
    """The tiny base model shipped inside the package: the default `--model` of every command."""
    if not (SHIPPED_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the shipped model is missing from {SHIPPED_MODEL}; pass --model DIR")
    return SHIPPED_MODEL


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`auto` picks CUDA with bfloat16 where a GPU is visible, else the CPU with float32; names otherwise."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to this process")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose auto or one of {sorted(DTYPES)}")
    return device, DTYPES[dtype]


@functools.cache
def bf16_autocast_pays(device_type: str) -> bool:
    """Whether bf16 autocast makes training faster on this machine: on CUDA where the GPU supports bf16; on the
    CPU where oneDNN has bf16 kernels and a bf16 matrix product then measures faster than the float32 one (once per
    process, a few milliseconds). CPUs with AVX-512 BF16 or AMX run it 2.5-7x faster; one with AVX2 alone has no
    bf16 kernels and emulates them 55x slower (measured: 0.7 against 39.5 GFLOP/s, one thread, an AMD EPYC with
    AVX2 alone), which made a step of the base recipe's `read` stage 18x slower (39.6 s against 2.2 s)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:
        if not onednn_bf16_kernels():
            return False
    except (AttributeError, RuntimeError):  # a build without oneDNN: measure
        pass
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=generator), torch.randn(512, 256, generator=generator)

    def best_of_three(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up: kernel selection and packing
        times = []
        for _ in range(3):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best_of_three(a.bfloat16(), b.bfloat16()) < best_of_three(a, b)


ATTENTION = ("sdpa", "eager", "flash_attention_2")


def check_attention(attn_implementation: str, device: torch.device, dtype: torch.dtype | None) -> None:
    """A clear error for an attention choice this machine or setting cannot run."""
    if attn_implementation not in ATTENTION:
        raise ValueError(f"attention {attn_implementation!r}: choose one of {list(ATTENTION)}")
    if attn_implementation != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        raise ValueError("--attn flash_attention_2 needs the flash-attn package and a CUDA GPU, and this machine has "
                         "not both; use --attn sdpa (the default)")
    if torch.device(device).type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"--attn flash_attention_2 runs on a CUDA device in bfloat16 or float16, not on {device} "
                         f"in {dtype}")


def load_pretrained(folder: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu",
                    attn_implementation: str = "sdpa", adapter: str | os.PathLike | None = None):
    """(model in eval mode, tokenizer, processor) for a folder with config, safetensors and tokenizer files (or a
    hub id in the local cache). `adapter`: a PEFT (LoRA) folder -- an `adapter/` or a LoRA `checkpoint-N` --
    merged into the weights for inference."""
    check_attention(attn_implementation, torch.device(device), dtype)
    folder = resolve_model_dir(folder)
    model = MLLMModel.from_pretrained(folder, dtype=dtype, device=device, attn_implementation=attn_implementation)
    if adapter is not None:
        model = merge_adapter(model, adapter)
    if model.device.type == "cpu":
        cpu_matmul_layout(model.llm)
        pack_linears(model)  # products of several rows through oneDNN (mllm/model/cpu_linear.py)
    tokenizer = load_tokenizer(folder)
    return model.eval(), tokenizer, processor_for(model, tokenizer)


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def merge_adapter(model: MLLMModel, adapter: str | os.PathLike) -> MLLMModel:
    """The model with a PEFT adapter folder's weights merged in (safetensors only: a pickled adapter is refused)."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json (a PEFT adapter folder, e.g. a LoRA "
                                f"run's adapter/ or checkpoint-N)")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        pickled = sorted(p.name for p in adapter.glob("*.bin"))
        hint = f"; found {pickled}: pickle files are not loaded" if pickled else ""
        raise FileNotFoundError(f"--adapter {adapter}: no {ADAPTER_WEIGHTS}{hint}")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), use_safetensors=True).merge_and_unload()
