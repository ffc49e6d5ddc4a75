"""End-to-end `mllm answer` (questions file -> answers file) with our LLM against the same MLLM whose LLM is
transformers' `Qwen2ForCausalLM` holding the same weights; and bf16 against fp32. One process, interleaved.

Everything `mllm answer` does is timed: reading the questions, opening the images, chat prompts, slicing and
preprocessing, the vision tower and resampler, generation (ours: our decode loop; theirs: transformers'
`generate`), writing the answers. Two synthetic benches on rendered scenes of the built-in world, greedy, the
shipped tiny model, with the course's own settings for them: "describe" (detailed-description prompts, at most 160
new tokens, batch 8: the CHAIR evaluation) and "yes/no" (yes/no questions, at most 4 new tokens, batch 32: the
yes/no evaluation). Describing is mostly decoding; yes/no answers are a prefill of ~150 tokens per question
(image tokens + prompt) and one or two new tokens, where both variants run the same float32 matmuls at this
core's peak. The answers of the two variants are checked equal.

    python benchmarks/bench_answer.py [--quick] [--threads 1]
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import torch

import mllm.model.loading as loading
from bench_decode import TINY, qwen2_twin
from harness import benchmark_arguments, fmt_ratio, interleaved, pin, ratio
from mllm.eval import answer
from mllm.world import scenes


BENCHES = {"describe": dict(batch_size=8, max_new_tokens=160), "yes/no": dict(batch_size=32, max_new_tokens=4)}


def write_bench(folder: Path, n: int, kind: str) -> Path:
    rng = random.Random(f"bench-answer/{kind}")
    lines = []
    for i in range(n):
        image, scene = scenes.render_scene(scenes.sample_scene(rng, f"q{i}"))
        image.save(folder / f"{i}.png")
        question = rng.choice(scenes.DETAILED_PROMPTS) if kind == "describe" else \
            rng.choice(scenes.yesno_pair(scene, rng)[1])[0]
        lines.append(json.dumps({"id": i, "image": f"{i}.png", "question": question}))
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def variants() -> dict:
    """name -> (model, tokenizer, processor), as `load_pretrained` gives them."""
    ours = loading.load_pretrained(TINY)
    theirs_model, tokenizer, _ = loading.load_pretrained(TINY)
    plain = loading.load_pretrained(TINY)[0].llm  # a second copy to take the weights from
    theirs_model.llm = qwen2_twin(plain)
    theirs = (theirs_model, tokenizer, loading.processor_for(theirs_model, tokenizer))
    bf16 = loading.load_pretrained(TINY, dtype=torch.bfloat16)
    return {"ours": ours, "qwen2": theirs, "ours-bf16": bf16}


def main():
    args = benchmark_arguments(__doc__)
    cores = pin(args.threads)
    n, rounds = (16, 3) if args.quick else (64, 5)
    start = time.perf_counter()
    models = variants()
    original = loading.load_pretrained
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) pinned to cores {cores}; {n} questions "
          f"per bench, {rounds} rounds; ratios = baseline time / candidate time, median (min-max), thread CPU time")
    for kind, settings in BENCHES.items():
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            questions = write_bench(tmp, n, kind)

            def answering(name):
                def call():
                    loading.load_pretrained = lambda *a, **k: models[name]  # the model already in memory
                    try:
                        answer.run(TINY, questions, tmp / f"{name}.jsonl", quiet=True, overwrite=True,
                                   on_other_run="recompute", **settings)
                    finally:
                        loading.load_pretrained = original
                return call

            times = interleaved({name: answering(name) for name in models}, rounds)
            got = {name: [json.loads(line)["answer"] for line in (tmp / f"{name}.jsonl").read_text().splitlines()]
                   for name in models}
        assert got["ours"] == got["qwen2"], f"{kind}: ours and the Qwen2 variant answer differently"
        same_bf16 = sum(a == b for a, b in zip(got["ours"], got["ours-bf16"]))
        print(f"\n{kind} (batch {settings['batch_size']}, at most {settings['max_new_tokens']} new tokens): "
              + ", ".join(f"{name} {n / times[name].median():.1f} q/s" for name in models))
        print(f"  ours / transformers-Qwen2 LLM: {fmt_ratio(ratio(times['qwen2'].cpu, times['ours'].cpu))}  "
              f"(answers equal)")
        print(f"  bf16 / fp32 (ours):            {fmt_ratio(ratio(times['ours'].cpu, times['ours-bf16'].cpu))}  "
              f"({same_bf16}/{n} answers equal)")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
