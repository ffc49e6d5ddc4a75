"""Generation against transformers, same weights, one process: decode, prefill, bf16, and the DRAM bound.

Ours: `mllm.model.decode.decode` (our LLM on a static KV cache, the path `MLLMModel.generate` takes). Baseline:
transformers' `Qwen2ForCausalLM.generate` holding the same weights, sdpa attention. Greedy, prompts of text
tokens (batch 1 and 8, 128 tokens; the batch-8 prompts left-padded by 0-7 tokens), a stop token that is never
produced (so every call makes exactly N new tokens without forcing `min_new_tokens`), tokens checked equal.

- decode: per round, time(N new tokens) - time(1 new token) of the same model; prefill: time(1 new token).
- Every call of every case is interleaved with the others (see `harness.py`); ratios are per pair, baseline time
  over ours (> 1: ours faster), median (min-max) over the rounds; CPU time of the pinned thread.
- DRAM bound (batch 1): weight bytes read per token / the read bandwidth measured in the same run; the fraction
  is ours tokens/s over that bound.
- bf16: ours with bf16 weights (real bf16 kernels; AMX where the CPU has it) against ours in fp32 (both with the
  weight layout `load_pretrained` gives them on the CPU).

    python benchmarks/bench_decode.py [--quick] [--threads 1]
"""

from __future__ import annotations

import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from harness import benchmark_arguments, difference, dram_bandwidth, fmt_ratio, interleaved, pin, ratio
from mllm.model.configuration import LLMConfig
from mllm.model.cpu_linear import cpu_matmul_layout, pack_linears
from mllm.model.decode import decode
from mllm.model.llm import LLMForCausalLM
from mllm.model.loading import load_pretrained

TINY = "mllm/assets/tiny-base"


def benchmark_llm(hidden: int = 512, layers: int = 8) -> LLMForCausalLM:
    """The 55 M-parameter benchmark LLM (random weights)."""
    config = LLMConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=1408, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LLMForCausalLM(config).eval()


def qwen2_twin(ours: LLMForCausalLM) -> Qwen2ForCausalLM:
    c = ours.config
    qcfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                       num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                       rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                       rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    qcfg._attn_implementation = "sdpa"
    theirs = Qwen2ForCausalLM(qcfg).eval()
    theirs.load_state_dict(ours.state_dict())
    return theirs.to(ours.dtype)


def prompts(vocab: int, batch: int, length: int = 128):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, :i] = 0  # left padding of 0..B-1 tokens
        ids[i, :i] = 0
    return ids, mask


def cases_for(ours, theirs, ids, mask, new: int) -> dict:
    never = ours.config.vocab_size  # a stop id no logit can produce
    settings = dict(eos_token_id=[never], pad_token_id=0)
    embed = ours.get_input_embeddings()

    def run_ours(n):
        return lambda: decode(ours, embed(ids), mask, max_new_tokens=n, **settings)

    def run_theirs(n):
        return lambda: theirs.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, **settings)[
            :, ids.shape[1]:]

    return {"ours:1": run_ours(1), f"ours:{new}": run_ours(new), "theirs:1": run_theirs(1),
            f"theirs:{new}": run_theirs(new)}


def compare(name: str, ours, theirs, batch: int, new: int, rounds: int) -> dict:
    ids, mask = prompts(ours.config.vocab_size, batch)
    with torch.inference_mode():
        cases = cases_for(ours, theirs, ids, mask, new)
        a, b = cases[f"ours:{new}"](), cases[f"theirs:{new}"]()
        assert a.shape == (batch, new) and torch.equal(a, b), f"{name}: ours and transformers' tokens differ"
        t = interleaved(cases, rounds)
    dec_ours, dec_theirs = difference(t[f"ours:{new}"], t["ours:1"]), difference(t[f"theirs:{new}"], t["theirs:1"])
    row = {"decode": ratio(dec_theirs, dec_ours), "prefill": ratio(t["theirs:1"].cpu, t["ours:1"].cpu),
           "decode_tok_s": batch * (new - 1) / sorted(dec_ours)[len(dec_ours) // 2]}
    print(f"{name:<22} batch {batch}: decode {fmt_ratio(row['decode'])}  prefill {fmt_ratio(row['prefill'])}  "
          f"(ours {row['decode_tok_s']:.0f} new tok/s)", flush=True)
    return row


def bf16_against_fp32(ours: LLMForCausalLM, batch: int, new: int, rounds: int) -> None:
    lowp = LLMForCausalLM(ours.config).eval()
    lowp.load_state_dict(ours.state_dict())
    lowp = lowp.to(torch.bfloat16)
    cpu_matmul_layout(lowp)  # leaves bf16 as it is
    pack_linears(lowp)
    ids, mask = prompts(ours.config.vocab_size, batch)
    never = ours.config.vocab_size
    with torch.inference_mode():
        cases = {f"{k}:{n}": (lambda m=m, n=n: decode(m, m.get_input_embeddings()(ids), mask, max_new_tokens=n,
                                                         eos_token_id=[never], pad_token_id=0))
                 for k, m in (("fp32", ours), ("bf16", lowp)) for n in (1, new)}
        t = interleaved(cases, rounds)
    dec = ratio(difference(t[f"fp32:{new}"], t["fp32:1"]), difference(t[f"bf16:{new}"], t["bf16:1"]))
    pre = ratio(t["fp32:1"].cpu, t["bf16:1"].cpu)
    print(f"{'bf16 / fp32 (ours)':<22} batch {batch}: decode {fmt_ratio(dec)}  prefill {fmt_ratio(pre)}", flush=True)


def main():
    args = benchmark_arguments(__doc__)
    cores = pin(args.threads)
    rounds, new = (3, 8) if args.quick else (7, 32)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) pinned to cores {cores}; {rounds} rounds, "
          f"{new} new tokens, 128-token prompts; ratios = transformers time / ours time, median (min-max)\n")
    tiny = load_pretrained(TINY)[0].llm  # as `mllm answer` loads it (CPU weight layout included)
    big = benchmark_llm()
    for name, ours in (("shipped tiny model", tiny), ("55 M benchmark LLM", big)):
        theirs = qwen2_twin(ours)
        cpu_matmul_layout(ours)  # as `load_pretrained` leaves it on the CPU (the tiny model is loaded that way)
        pack_linears(ours)
        for batch in (1, 8):
            row = compare(name, ours, theirs, batch, new, rounds)
            if name.startswith("55") and batch == 1:
                # every weight is read once per new token, except the input embedding table (one row of it)
                weights = sum(p.numel() * p.element_size() for n, p in ours.named_parameters() if "embed" not in n)
                bound = dram_bandwidth() / weights
                print(f"{'':<22} DRAM bound: {weights / 2**20:.0f} MiB of weights read per token, {bound:.0f} tok/s; ours "
                      f"{row['decode_tok_s']:.0f} tok/s = {row['decode_tok_s'] / bound:.0%} of it", flush=True)
    for batch in (1, 8):
        bf16_against_fp32(big, batch, new, rounds)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
