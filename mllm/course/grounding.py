"""`mllm course --stage grounding`: Acc@0.5 of the base model on the world's held-out referring expressions,
grounding fine-tuning (a time-capped cosine schedule, `CosineToDeadline`), Acc@0.5 again (`course_stage`)."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from mllm.train.sft import DataArguments, ModelArguments, SFTTrainingArguments

EXERCISE_REFCOCO_VAL = 67.5  # the exercise report's RefCOCO val Acc@0.5 (first 1/5 of the split; eval_facts §3.4)


class CosineToDeadline(TrainerCallback):
    """Linear warmup then cosine decay to 0 over whichever runs out first, `max_steps` or `minutes` of wall
    clock; training stops at the deadline. The course runs on 2 shared cores whose speed varies several-fold
    with their load: a step count alone either overruns the stage's time budget or leaves the rate high when
    a time limit cuts it. Use with lr_scheduler_type="constant": before every step this callback sets the rate
    in the optimizer and in the constant scheduler, so the logs show the rate used.
    `stopped_at` is the step at which the deadline stopped training (None: max_steps came first)."""

    def __init__(self, minutes: float, warmup: float = 0.05):
        self.seconds, self.warmup = minutes * 60, warmup
        self.started, self.peak, self.lr, self.stopped_at = None, None, None, None

    def progress(self, state) -> float:
        return max((time.time() - self.started) / self.seconds, state.global_step / max(state.max_steps, 1))

    def rate(self, progress: float) -> float:
        if progress < self.warmup:
            return self.peak * max(progress, 1e-3) / self.warmup
        return self.peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - self.warmup) / (1 - self.warmup))))

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.started, self.peak = time.time(), args.learning_rate
        if optimizer is not None:
            self.on_step_begin(args, state, control, optimizer, lr_scheduler)

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.lr = self.rate(self.progress(state))
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        if lr_scheduler is not None:  # the constant scheduler's base rate, and its last rate (what is logged)
            lr_scheduler.base_lrs = [self.lr] * len(optimizer.param_groups)
            lr_scheduler._last_lr = [self.lr] * len(optimizer.param_groups)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress(state) >= 1.0 and state.global_step < state.max_steps:
            control.should_training_stop = True
            self.stopped_at = state.global_step


def _budget(budget, name: str, default):
    value = getattr(budget, name, None)
    return default if value is None else value


def _acc(result: dict) -> dict:
    overall = result["overall"]
    return {"acc": round(overall["accuracy"], 4), "n": overall["n"], "mean_iou": round(overall["mean_iou"], 4),
            "parse_failure_rate": round(overall["parse_failure_rate"], 4)}


def course_stage(out: Path, budget, seed: int) -> dict:
    """`mllm course --stage grounding`: Acc@0.5 of the base model on the world's held-out `rec_test.jsonl`,
    fine-tuning on every object of `rec_train.jsonl` mixed with ~15% general SFT data (`sft_train.json`,
    against forgetting), then Acc@0.5 again; pictures of sampled cases and the loss curve are written.

    Budget attributes read (with defaults, so an older `Budget` works): grounding_steps (1700 for the full
    course: ~17 training minutes on 2 idle cores, so busy ones stop at the cap below; 20 for `--quick`),
    grounding_batch (32, capped at base_batch), grounding_lr (1e-4), grounding_mix (0.15), grounding_turns (1: one
    question per conversation),
    grounding_tune_vision / grounding_tune_resampler (True), grounding_minutes (17: the cosine schedule runs
    to whichever comes first, grounding_steps or these minutes of training, so the whole stage, two
    evaluations included, fits in 20 minutes), eval_limit (None: all 1079 expressions).
    """
    from mllm.data.grounding_prepare import PrepareOptions, prepare
    from mllm.eval.grounding import evaluate_model
    from mllm.train.sft import train

    out = Path(out)
    world, base = out / "world", out / "base" / "model"
    for needed, hint in ((world / "rec_train.jsonl", "the world"), (base / "config.json", "the base model")):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed}: {hint} is missing; run `mllm course --stage base` first")
    stage = out / "grounding"
    for old in ("before", "after", "model"):  # answers resume by path: never mix two runs' answers
        shutil.rmtree(stage / old, ignore_errors=True)
    stage.mkdir(parents=True, exist_ok=True)
    stage_started = time.time()
    steps = int(_budget(budget, "grounding_steps", 1700))
    batch = int(_budget(budget, "grounding_batch", min(32, _budget(budget, "base_batch", 32))))
    # 1e-4, not 1e-3: unfrozen at >= 5e-4 the tiny model's vision side collapses to image-independent output
    # (the base recipe's probe; grounding pilots from 1e-3 ended with one box for every image)
    lr = float(_budget(budget, "grounding_lr", 1e-4))
    mix_ratio = float(_budget(budget, "grounding_mix", 0.15))
    turns = int(_budget(budget, "grounding_turns", 1))
    minutes = float(_budget(budget, "grounding_minutes", 17.0))  # training wall-clock cap
    tune_vision = bool(_budget(budget, "grounding_tune_vision", True))
    tune_resampler = bool(_budget(budget, "grounding_tune_resampler", True))
    limit = getattr(budget, "eval_limit", None)
    test = [world / "rec_test.jsonl"]

    before = evaluate_model(base, test, stage / "before", limit=limit, batch_size=32, draw=4, seed=seed, quiet=True)
    print(f"grounding: base model Acc@0.5 {before['overall']['accuracy']:.3f} on {before['overall']['n']}", flush=True)
    data = stage / "grounding_train.json"
    report = prepare(data, [world / "rec_train.jsonl"], image_root=world,
                     options=PrepareOptions(turns_per_image=turns, seed=seed), mix=world / "sft_train.json",
                     mix_ratio=mix_ratio)
    clock = CosineToDeadline(minutes)
    started = time.time()
    trained = train(ModelArguments(model_name_or_path=str(base), tune_vision=tune_vision,
                                   tune_resampler=tune_resampler),
                    DataArguments(data_path=str(data), image_folder=str(world), model_max_length=512),
                    SFTTrainingArguments(output_dir=str(stage / "model"), max_steps=steps,
                                         per_device_train_batch_size=batch, learning_rate=lr,
                                         lr_scheduler_type="constant", weight_decay=0.01, adam_beta2=0.98,
                                         logging_steps=max(1, min(25, steps // 20)),
                                         save_strategy="no", report_to="none", seed=seed, dataloader_num_workers=0,
                                         train_sampling_strategy="group_by_length", yesno_eval_samples=0),
                    callbacks=[clock])
    train_minutes = (time.time() - started) / 60
    model_dir = Path(trained["model_dir"])
    after = evaluate_model(model_dir, test, stage / "after", limit=limit, batch_size=32, draw=8, seed=seed, quiet=True)
    b, a = _acc(before), _acc(after)
    result = {
        "stage": "grounding", "model_dir": str(model_dir), "before": b, "after": a,
        "train_minutes": round(train_minutes, 1), "stage_minutes": round((time.time() - stage_started) / 60, 1),
        "settings": {"steps": steps, "batch": batch, "lr": lr, "mix_ratio": mix_ratio, "turns_per_image": turns,
                     "tune_vision": tune_vision, "tune_resampler": tune_resampler, "eval_limit": limit,
                     "minutes_cap": minutes, "stopped_early_at_step": clock.stopped_at,
                     "train_records": report["records"], "frame": "unpadded image, 0-1000 grid",
                     "prompt": after["settings"]["prompt"]},
        "data_report": {k: report[k] for k in ("read", "written", "clipped", "skipped")},
        "loss_curve": str(model_dir / "loss_curve.png"),
        "pictures": {"before": before.get("pictures", []), "after": after.get("pictures", [])},
        "final_train_loss": next((h["loss"] for h in reversed(trained["log_history"]) if "loss" in h), None),
        "table_rows": [f"| grounding | Acc@0.5 (held-out synthetic, n={a['n']}) | {b['acc']:.2f} -> {a['acc']:.2f} | "
                       f"RefCOCO val {EXERCISE_REFCOCO_VAL} (exercise report, 1/5 subset) |"],
    }
    (stage / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result

