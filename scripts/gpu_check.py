"""One short GPU check of the model and its training path; every result under one folder (see gpu_check.sh).

Checks, each written to `<out>/gpu_check.json` as it finishes (a failing check is recorded, the rest still run):
  env          torch / CUDA versions, device name, capability
  bf16_vs_fp32 logits of the shipped model on 16 synthetic scenes in float32 and bfloat16 on the GPU
  sdpa_vs_eager  float32 logits with the two attention implementations
  flash_attention_2  bf16 logits and greedy answers, flash-attn against sdpa (when flash-attn is installed)
  cpu_vs_cuda  float32 logits on the CPU and on the GPU; greedy answers on both
  generate     batched greedy answers (bf16 on the GPU) against the float32 ones
  sft_bf16     20 steps of SFT of the tiny preset in bf16 on the GPU (DeepSpeed ZeRO-2 when importable),
               loss curve, steps/s
  peak_memory  torch.cuda.max_memory_allocated over the whole run
"""

from __future__ import annotations

import json
import random
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mllm.model.generation import GenerationSettings, build_chat_prompt, generate  # noqa: E402
from mllm.model.loading import default_model_dir, load_pretrained  # noqa: E402
from mllm.world import scenes  # noqa: E402

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_check")
OUT.mkdir(parents=True, exist_ok=True)
RESULTS: dict = {}


def record(name: str, fn) -> None:
    started = time.time()
    try:
        RESULTS[name] = {"ok": True, **fn()}
    except Exception as err:  # one broken check must not hide the others
        RESULTS[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
    RESULTS[name]["seconds"] = round(time.time() - started, 2)
    print(f"== {name}: {json.dumps(RESULTS[name], default=str)[:600]}", flush=True)
    (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def questions(n: int = 16) -> list[tuple]:
    rng = random.Random("gpu_check")
    items = []
    for i in range(n):
        image, scene = scenes.render_scene(scenes.sample_scene(rng, f"g{i}"))
        kind, pair = scenes.yesno_pair(scene, rng)
        prompt = pair[0][0] if i % 2 else rng.choice(scenes.DETAILED_PROMPTS)
        items.append((image, prompt))
    return items


def batch_inputs(processor, tokenizer, items) -> dict:
    texts, images = [], []
    for image, prompt in items:
        text, ordered = build_chat_prompt([{"role": "user", "content": [image, prompt]}], tokenizer)
        texts.append(text)
        images.append(ordered)
    return processor(texts, images)


def logits_of(model, inputs) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", "pixel_values", "tgt_sizes", "image_bound")
    batch = {k: inputs[k] for k in keys}
    device = model.device
    batch["input_ids"] = batch["input_ids"].to(device)
    batch["attention_mask"] = batch["attention_mask"].to(device)
    with torch.inference_mode():
        out = model(**batch).logits.float()
    mask = inputs["attention_mask"].bool()
    return out[mask.to(out.device)].cpu()  # (real tokens, vocab)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs_diff": float((a - b).abs().max()), "ref_max_abs": float(a.abs().max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def main() -> None:
    model_dir = default_model_dir()
    items = questions()

    record("env", lambda: {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "device": torch.cuda.get_device_name(0),
                           "capability": list(torch.cuda.get_device_capability(0))})
    torch.cuda.reset_peak_memory_stats()
    cpu_model, tokenizer, processor = load_pretrained(model_dir, dtype=torch.float32, device="cpu")
    inputs = batch_inputs(processor, tokenizer, items)
    cpu_logits = logits_of(cpu_model, inputs)
    settings = GenerationSettings(decoding="greedy", max_new_tokens=48)
    cpu_answers = generate(cpu_model, inputs, tokenizer, settings)

    def cpu_vs_cuda() -> dict:
        model, _, _ = load_pretrained(model_dir, dtype=torch.float32, device="cuda")
        answers = generate(model, inputs, tokenizer, settings)
        same = sum(a == b for a, b in zip(answers, cpu_answers))
        return {**compare(cpu_logits, logits_of(model, inputs)), "greedy_answers_equal": f"{same}/{len(answers)}"}

    def bf16_vs_fp32() -> dict:
        fp32, _, _ = load_pretrained(model_dir, dtype=torch.float32, device="cuda")
        bf16, _, _ = load_pretrained(model_dir, dtype=torch.bfloat16, device="cuda")
        return compare(logits_of(fp32, inputs), logits_of(bf16, inputs))

    def sdpa_vs_eager() -> dict:
        model, _, _ = load_pretrained(model_dir, dtype=torch.float32, device="cuda")
        sdpa = logits_of(model, inputs)
        model.llm.config._attn_implementation = "eager"
        return compare(sdpa, logits_of(model, inputs))

    def flash_vs_sdpa() -> dict:
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            return {"skipped": "flash-attn is not installed"}
        sdpa, _, _ = load_pretrained(model_dir, dtype=torch.bfloat16, device="cuda")
        flash, _, _ = load_pretrained(model_dir, dtype=torch.bfloat16, device="cuda",
                                      attn_implementation="flash_attention_2")
        same = sum(a == b for a, b in zip(generate(flash, inputs, tokenizer, settings),
                                          generate(sdpa, inputs, tokenizer, settings)))
        return {**compare(logits_of(sdpa, inputs), logits_of(flash, inputs)),
                "greedy_answers_equal": f"{same}/{len(inputs['input_ids'])}"}

    def generate_bf16() -> dict:
        model, _, _ = load_pretrained(model_dir, dtype=torch.bfloat16, device="cuda")
        started = time.time()
        answers = generate(model, inputs, tokenizer, settings)
        seconds = time.time() - started
        same = sum(a == b for a, b in zip(answers, cpu_answers))
        return {"greedy_answers_equal_to_cpu_fp32": f"{same}/{len(answers)}", "seconds": round(seconds, 2),
                "examples": [[p, a] for (_, p), a in list(zip(items, answers))[:4]]}

    record("cpu_vs_cuda", cpu_vs_cuda)
    record("bf16_vs_fp32", bf16_vs_fp32)
    record("sdpa_vs_eager", sdpa_vs_eager)
    record("flash_attention_2", flash_vs_sdpa)
    record("generate", generate_bf16)
    record("sft_bf16", lambda: sft_run(OUT / "sft"))
    record("peak_memory", lambda: {"max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)})


def sft_run(folder: Path) -> dict:
    """20 bf16 SFT steps of the shipped model on fresh synthetic conversations, on the GPU."""
    import importlib.util

    from mllm.train.sft import DataArguments, ModelArguments, SFTTrainingArguments, train

    rng = random.Random("gpu_check/sft")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(160):
        image, scene = scenes.render_scene(scenes.sample_scene(rng, f"s{i}"))
        image.save(folder / "images" / f"{i}.png")
        question, answer = rng.choice(scenes.yesno_pair(scene, rng)[1])
        records.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"role": "user", "content": "<image>\n" + question}, {"role": "assistant", "content": answer}]})
    (folder / "train.json").write_text(json.dumps(records))
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    started = time.time()
    result = train(ModelArguments(model_name_or_path=str(default_model_dir())),
                    DataArguments(data_path=str(folder / "train.json"), image_folder=str(folder), model_max_length=512),
                    SFTTrainingArguments(output_dir=str(folder / "out"), max_steps=20, per_device_train_batch_size=8,
                                         learning_rate=1e-4, bf16=True, logging_steps=1, save_strategy="no",
                                         report_to="none", seed=0, dataloader_num_workers=0, yesno_eval_samples=0,
                                         deepspeed=str(REPO / "configs" / "ds_zero2.json") if deepspeed else None))
    seconds = time.time() - started
    losses = [round(e["loss"], 4) for e in result["log_history"] if "loss" in e]
    return {"deepspeed_zero2": deepspeed, "losses": losses, "steps_per_s": round(20 / seconds, 2),
            "loss_fell": bool(losses and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5)}


if __name__ == "__main__":
    main()
