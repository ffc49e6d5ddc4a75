"""The inference path against transformers, same weights, same run: generation and image preprocessing.

1. Generation: `MLLMModel.generate` (fused embeddings -> our LLM -> transformers' generation loop) against
   `Qwen2ForCausalLM.generate` holding the same LLM weights, greedy, on prompts of text tokens (batch 1 and
   8, left-padded to one length). Prefill tokens/s = prompt tokens / time of a 1-token generate; decode
   tokens/s = new tokens / (time of an N-token generate - time of the 1-token one). Calls are interleaved
   and medians taken, so load from other processes hits both alike.
2. Image preprocessing: images/s turning one 1344x1344 image into its 10 views (source + 3x3 slices of
   448x448, BICUBIC, normalised), ours (`ImageProcessor`) against transformers' MiniCPM-V image processor
   (`MiniCPMV4_6ImageProcessorPil`, whose slicing gives the same 10 views of 448x448 for this size).

    python benchmarks/bench_generate.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2Config, Qwen2ForCausalLM

from mllm.model.configuration import LLMConfig, MLLMConfig, SliceConfig, VisionConfig
from mllm.model.image_processing import ImageProcessor
from mllm.model.modeling_mllm import MLLMModel


class FixedTokenizer:
    """Just enough of a tokenizer for `mllm.model.generation`: stop ids that never occur, plain decode."""

    pad_token_id = 0
    unk_token_id = -1

    def convert_tokens_to_ids(self, token):
        return 1 if token == "<|im_end|>" else None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def build(args):
    llm = LLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                    num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                    rope_theta=1e6, max_position_embeddings=4096)
    config = MLLMConfig(llm=llm, vision=VisionConfig(hidden_size=64, image_size=224, intermediate_size=128,
                                                     num_attention_heads=2, num_hidden_layers=1),
                        slice=SliceConfig(), query_num=16, drop_vision_last_layer=False)
    torch.manual_seed(0)
    ours = MLLMModel(config).eval()
    qcfg = Qwen2Config(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                       intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_hidden_layers,
                       num_attention_heads=llm.num_attention_heads, num_key_value_heads=llm.num_key_value_heads,
                       max_position_embeddings=llm.max_position_embeddings,
                       rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta})
    qcfg._attn_implementation = "sdpa"
    theirs = Qwen2ForCausalLM(qcfg).eval()
    theirs.load_state_dict(ours.llm.state_dict())
    return ours, theirs


def time_generation(ours, theirs, batch: int, prompt: int, new: int, repeats: int):
    tokenizer = FixedTokenizer()
    ids = torch.randint(2, ours.config.llm.vocab_size, (batch, prompt))
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask}
    common = dict(do_sample=False, pad_token_id=0, eos_token_id=[1])

    def run_ours(n):
        return ours.generate(inputs, tokenizer, max_new_tokens=n, min_new_tokens=n)

    def run_theirs(n):
        return theirs.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **common)

    times = {("ours", 1): [], ("ours", new): [], ("theirs", 1): [], ("theirs", new): []}
    with torch.inference_mode():
        run_ours(2), run_theirs(2)  # warm-up
        for r in range(repeats):
            order = [("ours", run_ours), ("theirs", run_theirs)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                for n in (1, new):
                    t0 = time.perf_counter()
                    fn(n)
                    times[(name, n)].append(time.perf_counter() - t0)
    result = {}
    for name in ("ours", "theirs"):
        t1, tn = statistics.median(times[(name, 1)]), statistics.median(times[(name, new)])
        result[name] = (batch * prompt / t1, batch * (new - 1) / max(tn - t1, 1e-9))
    return result


def time_preprocessing(repeats: int):
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (1344, 1344, 3), dtype=np.uint8))
    ours = ImageProcessor(max_slice_nums=9, scale_resolution=448, patch_size=14)
    theirs = MiniCPMV4_6ImageProcessorPil(max_slice_nums=9, scale_resolution=448, patch_size=14,
                                          downsample_mode="4x")
    assert len(ours(image)["pixel_values"]) == 10
    fns = {"ours": lambda: ours(image), "theirs": lambda: theirs(image, return_tensors="pt")}
    times = {k: [] for k in fns}
    for k, fn in fns.items():
        fn()  # warm-up
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: 1.0 / statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, new = (3, 8) if args.quick else (7, 32)
    ours, theirs = build(args)
    print(f"LLM: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; prompt 128 tokens, {new} new; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'phase':>8} {'ours tok/s':>11} {'qwen2 tok/s':>12} {'ours/qwen2':>11}")
    for batch in (1, 8):
        r = time_generation(ours, theirs, batch, 128, new, repeats)
        for i, phase in enumerate(("prefill", "decode")):
            print(f"{batch:>5} {phase:>8} {r['ours'][i]:>11.1f} {r['theirs'][i]:>12.1f} {r['ours'][i] / r['theirs'][i]:>11.3f}")
    p = time_preprocessing(5 if args.quick else 15)
    print(f"\nimage preprocessing, 1344x1344 -> 10 views: ours {p['ours']:.1f} img/s, "
          f"transformers MiniCPMV4_6ImageProcessorPil {p['theirs']:.1f} img/s, ratio {p['ours'] / p['theirs']:.3f}")


if __name__ == "__main__":
    main()
