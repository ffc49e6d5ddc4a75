"""Training throughput, peak memory and model FLOPs utilization (MFU) of the tiny preset on this CPU: float32,
float32 with activation checkpointing, and bf16 autocast (what the Trainer's `--bf16` does on the CPU).

One training step = forward of a collated SFT batch (real data path: conversation -> ids/labels, images sliced
and patchified) + `sft_loss` + backward + AdamW step; the HF Trainer's bookkeeping is left out.

- The three configurations live in one process and their steps are interleaved call by call (see `harness.py`),
  so load from other processes hits them alike; samples/s from the median step (thread CPU time).
- activation memory: the bytes of the tensors autograd saves for the backward of one step (weights excluded),
  counted through `torch.autograd.graph.saved_tensors_hooks` (RSS cannot tell the configurations apart in one
  process: the allocator reuses what another one freed).
- MFU: model FLOPs per step (counted with `torch.utils.flop_counter.FlopCounterMode` on a step without
  checkpointing, so the recomputation is not credited) x steps/s / the peak matmul FLOP/s of this core measured
  in the same run at the same thread count (float32 for the float32 rows, bf16 for the bf16 row; both printed).

    python benchmarks/bench_train.py [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image, ImageDraw

from harness import fmt_ratio, interleaved, matmul_peak, pin, ratio

QUESTION = "Is there a red circle in the image? Please answer yes or no."
ANSWERS = ["Yes", "No", "There is a red circle and a blue square.", "a green star on the left."]


def build(args, checkpointing: bool):
    """(model, batch) of the tiny preset with its own tokenizer; the batch has `args.batch` samples."""
    from mllm.data.collate import SupervisedCollator
    from mllm.data.conversation import conversation_to_ids, place_images
    from mllm.model.configuration import MLLMConfig
    from mllm.model.image_processing import ImageProcessor
    from mllm.model.modeling_mllm import MLLMModel
    from mllm.model.tokenization import build_tokenizer

    tokenizer = build_tokenizer([QUESTION, *ANSWERS] * 20, vocab_size=400)
    config = MLLMConfig.from_preset("tiny")
    config.llm.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = MLLMModel(config).train()
    if checkpointing:
        model.activation_checkpointing_enable()  # transformers' switch, as the Trainer calls it
    processor = ImageProcessor.from_config(config.slice)
    samples = []
    for i in range(args.batch):
        image = Image.new("RGB", (args.image_px, args.image_px), "white")
        ImageDraw.Draw(image).ellipse((10, 10, args.image_px // 2, args.image_px // 2), fill="red")
        views = processor(image)
        conv = [{"role": "user", "content": f"<image>\n{QUESTION}"},
                {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]
        placed, _ = place_images(conv, {"<image>": views["grid"]}, config.query_num)
        sample = conversation_to_ids(placed, tokenizer, query_num=config.query_num)
        samples.append(sample | {"pixel_values": views["pixel_values"], "tgt_sizes": views["tgt_sizes"]})
    return model, SupervisedCollator()(samples)


def train_step(model, optimizer, batch) -> None:
    from mllm.train.losses import sft_loss

    inputs = dict(batch)
    labels = inputs.pop("labels")
    sft_loss(model(**inputs).logits, labels).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def saved_activation_mib(model, batch, bf16: bool) -> float:
    """MiB of the tensors autograd keeps for the backward of one step (each storage counted once): the activation
    memory, independent of the allocator's habits."""
    from mllm.train.losses import sft_loss

    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = dict(batch)
    labels = inputs.pop("labels")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sft_loss(model(**inputs).logits, labels)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del loss
    return sum(n for ptr, n in storages.items() if ptr not in parameters) / 2**20


def step_flops(args) -> int:
    """FLOPs of one forward + backward, counted operator by operator."""
    from torch.utils.flop_counter import FlopCounterMode

    from mllm.train.losses import sft_loss

    model, batch = build(args, checkpointing=False)
    inputs = dict(batch)
    labels = inputs.pop("labels")
    with FlopCounterMode(display=False) as counter:
        sft_loss(model(**inputs).logits, labels).backward()
    return counter.get_total_flops()


CONFIGS = {"float32": dict(checkpointing=False, bf16=False),
           "float32 + checkpointing": dict(checkpointing=True, bf16=False),
           "bf16 autocast": dict(checkpointing=False, bf16=True)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-px", type=int, default=112, help="square images; 112 = one 8x8-patch view")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 3
    cores = pin(args.threads)
    peaks = {torch.float32: matmul_peak(torch.float32), torch.bfloat16: matmul_peak(torch.bfloat16)}
    model_flops = step_flops(args)
    state = {}
    for name, config in CONFIGS.items():
        model, batch = build(args, config["checkpointing"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        state[name] = (model, optimizer, batch, config["bf16"])
    memory = {name: saved_activation_mib(model, batch, bf16) for name, (model, _, batch, bf16) in state.items()}

    def stepper(name):
        model, optimizer, batch, bf16 = state[name]

        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                train_step(model, optimizer, batch)
        return call

    times = interleaved({name: stepper(name) for name in CONFIGS}, args.steps, warmup=2)
    seq = state["float32"][2]["input_ids"].shape[1]
    print(f"tiny preset, batch {args.batch}, {args.image_px}px images, seq len {seq}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s) pinned to cores {cores}; {args.steps} interleaved steps each")
    print(f"peak matmul of this core, this run: float32 {peaks[torch.float32] / 1e9:.1f} GFLOP/s, bf16 "
          f"{peaks[torch.bfloat16] / 1e9:.1f} GFLOP/s; model FLOPs per step {model_flops / 1e9:.2f} GFLOP (counted)")
    print(f"\n{'configuration':<25}{'samples/s':>10}{'step ms':>9}{'act. MiB':>10}{'MFU':>8}   vs float32")
    base = times["float32"].cpu
    for name, config in CONFIGS.items():
        step = times[name].median()
        peak = peaks[torch.bfloat16 if config["bf16"] else torch.float32]
        mib = f"{memory[name]:.1f}"
        speed = fmt_ratio(ratio(base, times[name].cpu)) if name != "float32" else "-"
        print(f"{name:<25}{args.batch / step:>10.1f}{1000 * step:>9.0f}{mib:>10}{model_flops / step / peak:>8.1%}   "
              f"{speed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
