"""Tokens/s of mllm's LLMForCausalLM against transformers' Qwen2ForCausalLM (sdpa), same weights, same run.

For batch 1 and 8: prefill (one forward over a prompt, logits for the last position only, as generate does)
and decode (single-token steps on a KV cache filled by an untimed prefill). The two models are interleaved
call by call, alternating which goes first, after a warm-up. Tokens/s are medians over the calls; the ratio
is the median of the per-pair ratios (each call of ours against the neighbouring call of Qwen2's), which
stays fair when load from other processes comes and goes during the run.

    python benchmarks/bench_llm.py               # ~1 min on 2 idle CPU cores, more when they are shared
    python benchmarks/bench_llm.py --threads 1   # steadier when other processes compete for the cores
    python benchmarks/bench_llm.py --quick       # ~15 s smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mllm.model.configuration import LLMConfig
from mllm.model.llm import LLMForCausalLM


def build_models(args):
    cfg = LLMConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        rope_theta=1e6, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    ours = LLMForCausalLM(cfg).eval()
    qcfg = Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    qcfg._attn_implementation = "sdpa"
    theirs = Qwen2ForCausalLM(qcfg).eval()
    theirs.load_state_dict(ours.state_dict())
    return cfg, ours, theirs


def prefill_times(models, ids, repeats):
    """Seconds per prefill forward for each model, calls interleaved (alternating who goes first)."""
    times = [[] for _ in models]
    for r in range(repeats):
        for i in (range(len(models)) if r % 2 == 0 else reversed(range(len(models)))):
            t0 = time.perf_counter()
            models[i](ids, use_cache=True, logits_to_keep=1)
            times[i].append(time.perf_counter() - t0)
    return times


def decode_times(models, ids, steps, repeats):
    """Seconds per single-token decode step for each model. Both decode in lockstep, one step each in turn, on
    KV caches filled by an untimed prefill, so that load from other processes hits both alike."""
    times = [[] for _ in models]
    gen = torch.Generator().manual_seed(1)
    new = torch.randint(0, models[0].config.vocab_size, (ids.shape[0], steps), generator=gen)  # (B, steps)
    for r in range(repeats):
        caches = [m(ids, use_cache=True, logits_to_keep=1).cache for m in models]
        for t in range(steps):
            for i in (range(len(models)) if (r + t) % 2 == 0 else reversed(range(len(models)))):
                t0 = time.perf_counter()
                caches[i] = models[i](new[:, t : t + 1], cache=caches[i], use_cache=True).cache
                times[i].append(time.perf_counter() - t0)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run (few repeats, short prompt) as a smoke test")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--steps", type=int, default=32, help="decode steps per repeat")
    p.add_argument("--prefill-repeats", type=int, default=15)
    p.add_argument("--decode-repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    if args.quick:
        args.prompt, args.steps, args.prefill_repeats, args.decode_repeats = 32, 8, 3, 1

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg, ours, theirs = build_models(args)
    models = [ours, theirs]
    n_params = sum(w.numel() for w in ours.parameters())
    print(f"config: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads} q/kv heads, ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
          f"{n_params / 1e6:.1f}M params, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"prefill: {args.prompt}-token prompt, median of {args.prefill_repeats} forwards; decode: median of "
          f"{args.decode_repeats} x {args.steps} steps; the two models interleaved call by call\n")
    print(f"{'batch':>5} {'phase':>8} {'ours tok/s':>11} {'qwen2 tok/s':>12} {'ours/qwen2':>11}")
    with torch.inference_mode():
        for B in args.batches:
            ids = torch.randint(0, cfg.vocab_size, (B, args.prompt), generator=torch.Generator().manual_seed(B))
            diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
            assert diff < 1e-3, f"the two models disagree (max |logits diff| {diff:.2e})"
            decode_times(models, ids, min(args.steps, 4), 1)  # warm-up (allocator, kernels) for both
            results = {
                "prefill": (prefill_times(models, ids, args.prefill_repeats), B * args.prompt),
                "decode": (decode_times(models, ids, args.steps, args.decode_repeats), B),
            }
            for phase, ((t_ours, t_theirs), tokens) in results.items():
                tps_ours, tps_theirs = tokens / statistics.median(t_ours), tokens / statistics.median(t_theirs)
                ratio = statistics.median(b / a for a, b in zip(t_ours, t_theirs))  # > 1: ours faster
                print(f"{B:>5} {phase:>8} {tps_ours:>11.1f} {tps_theirs:>12.1f} {ratio:>11.3f}", flush=True)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
