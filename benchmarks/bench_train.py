"""Training throughput, peak memory and model FLOPs utilization (MFU) of the tiny preset on this CPU, with and
without activation checkpointing.

One training step = forward of a collated SFT batch (real data path: conversation -> ids/labels, images sliced
and patchified) + `sft_loss` + backward + AdamW step; the HF Trainer's bookkeeping is left out.

- samples/s: batch size x timed steps / wall time, after warm-up steps.
- peak memory: the process's peak RSS during the steps minus its RSS just before them (activations,
  gradients, optimizer state, allocator slack). On Linux the peak is reset first (`/proc/self/clear_refs`,
  read back as VmHWM); elsewhere it falls back to `resource.getrusage` max RSS, which never goes down. Each
  configuration runs in its own fresh process.
- MFU: model FLOPs per step (counted with `torch.utils.flop_counter.FlopCounterMode` on a step without
  checkpointing, so the recomputation is not credited) x steps/s / peak fp32 matmul FLOP/s of this CPU,
  measured in the same run with a large matmul. The 6 x params x tokens (+ attention) estimate is printed
  beside the count as a cross-check.
- threads: with other processes on the same cores, several OpenMP threads stall each other at every
  barrier (measured: 9 s instead of 0.26 s per step with 2 threads on 2 busy cores). The header prints the
  load average; compare numbers only from quiet runs, or pass --threads 1.

    python benchmarks/bench_train.py           # ~1 min on 2 CPU cores
    python benchmarks/bench_train.py --quick   # a few seconds, smoke test
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time

import torch
from PIL import Image, ImageDraw

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
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.llm.disable_input_require_grads()
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


def rss_kib() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) in KiB."""
    try:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return peak, peak


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def run_config(args, checkpointing: bool, queue) -> None:
    """In a fresh process: samples/s and max-RSS growth of training steps."""
    torch.set_num_threads(args.threads)
    model, batch = build(args, checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reset_peak_rss()
    rss_before, _ = rss_kib()
    for _ in range(args.warmup):
        train_step(model, optimizer, batch)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, optimizer, batch)
    seconds = time.perf_counter() - start
    _, rss_peak = rss_kib()
    queue.put({"samples_per_s": args.batch * args.steps / seconds, "step_s": seconds / args.steps,
               "peak_mib": (rss_peak - rss_before) / 1024})


def peak_matmul_flops(n: int, repeats: int) -> float:
    """Best fp32 FLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def step_flops(args, checkpointing: bool) -> int:
    """FLOPs of one forward + backward, counted operator by operator."""
    from torch.utils.flop_counter import FlopCounterMode

    from mllm.train.losses import sft_loss

    model, batch = build(args, checkpointing)
    inputs = dict(batch)
    labels = inputs.pop("labels")
    with FlopCounterMode(display=False) as counter:
        sft_loss(model(**inputs).logits, labels).backward()
    return counter.get_total_flops()


def estimated_flops(args) -> tuple[float, dict]:
    """6 x params x tokens per component, plus causal attention scores of the LLM (a rough cross-check)."""
    model, batch = build(args, False)
    cfg = model.config
    text_tokens = int(batch["attention_mask"].sum())
    vision_tokens = sum(int(t.prod(dim=-1).sum()) for t in batch["tgt_sizes"])  # patches over all views
    llm = sum(p.numel() for n, p in model.llm.named_parameters() if "embed_tokens" not in n)
    vpm = sum(p.numel() for p in model.vpm.parameters())
    resampler = sum(p.numel() for p in model.resampler.parameters())
    seq = batch["input_ids"].shape[1]
    # per layer, forward QK^T and AV: 2 * 2 * L^2 * d; x3 for forward + backward; causal halves it
    attention = 3 * 2 * 2 * seq**2 * cfg.llm.hidden_size * cfg.llm.num_hidden_layers * args.batch / 2
    total = 6 * (llm * text_tokens + (vpm + resampler) * vision_tokens) + attention
    return total, {"text_tokens": text_tokens, "vision_tokens": vision_tokens, "seq_len": seq}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-px", type=int, default=112, help="square images; 112 = one 8x8-patch view")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="few steps, small matmul")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.matmul_n = 3, 1, 1024
    torch.set_num_threads(args.threads)

    peak = peak_matmul_flops(args.matmul_n, repeats=5)
    model_flops = step_flops(args, checkpointing=False)
    executed_flops = step_flops(args, checkpointing=True)
    estimate, sizes = estimated_flops(args)
    context = mp.get_context("spawn")
    rows = []
    for checkpointing in (False, True):
        queue = context.Queue()
        proc = context.Process(target=run_config, args=(args, checkpointing, queue))
        proc.start()
        result = queue.get()
        proc.join()
        mfu = model_flops * result["samples_per_s"] / args.batch / peak
        rows.append(("on" if checkpointing else "off", result, mfu))

    print(f"tiny preset, batch {args.batch}, {args.image_px}px images, seq len {sizes['seq_len']} "
          f"({sizes['text_tokens']} text + {sizes['vision_tokens']} vision-patch tokens), {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"peak fp32 matmul ({args.matmul_n}^3): {peak / 1e9:.1f} GFLOP/s")
    print(f"model FLOPs per step: {model_flops / 1e9:.2f} GFLOP counted (6ND + attention estimate "
          f"{estimate / 1e9:.2f}); executed with checkpointing: {executed_flops / 1e9:.2f} GFLOP")
    print(f"\n{'checkpointing':<15}{'samples/s':>11}{'step ms':>10}{'peak MiB':>10}{'MFU':>8}")
    for name, r, mfu in rows:
        print(f"{name:<15}{r['samples_per_s']:>11.1f}{1000 * r['step_s']:>10.0f}{r['peak_mib']:>10.1f}{mfu:>8.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
