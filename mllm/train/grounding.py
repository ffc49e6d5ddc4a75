"""`mllm train grounding`: visual-grounding fine-tuning, a thin recipe over `mllm.train.sft.train`.

    mllm train grounding --model_name_or_path DIR --rec REC_refcoco_unc_train.jsonl [--rec ...] \\
        --image_folder coco/train2014 --output_dir output/mllm_grounding [--mix sft_train.json --mix_ratio 0.15] \\
        [--eval_rec REC_refcoco_unc_val.jsonl --eval_limit 500] [any `mllm train sft` option]

1. With `--rec` / `--flickr` files, `mllm.data.grounding_prepare.prepare` writes the conversations (and their
   report) to `<output_dir>/grounding_train.json`; with `--data_path` an already prepared file is used.
2. `mllm.train.sft.train` fine-tunes (every SFT option works; the recipe only changes defaults: no yes/no
   generation during evaluation, a log every 10 steps).
3. With `--eval_rec`, the trained model answers those REC files (`mllm.eval.grounding.evaluate_model`) and the
   Acc@0.5 table is printed and written to `<output_dir>/grounding_eval/grounding.json`.

`course_stage(out, budget, seed)` is the course's grounding stage on the synthetic world (see its docstring).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from mllm.train.sft import DataArguments, ModelArguments, SFTTrainingArguments

EXERCISE_REFCOCO_VAL = 67.5  # the exercise report's RefCOCO val Acc@0.5 (first 1/5 of the split; eval_facts §3.4)


@dataclass
class GroundingDataArguments:
    rec: list[str] = field(default_factory=list, metadata={"help": "one or more Shikra REC jsonl files"})
    flickr: list[str] = field(default_factory=list,
                              metadata={"help": "one or more Flickr30k-entities jsonl files (gc task)"})
    data_path: str | None = field(default=None, metadata={"help": "an already prepared conversations JSON"})
    image_folder: str = field(default=".", metadata={"help": "folder the image paths are relative to"})
    tasks: str = field(default="rec", metadata={"help": "comma-separated: rec, reg, gc"})
    style: str = field(default="plain", metadata={"help": "box text: plain [x0,y0,x1,y1] or qwen <box>",
                                                  "choices": ["plain", "qwen"]})
    templates: str = field(default="first", metadata={"help": "prompt template: first or random",
                                                      "choices": ["first", "random"]})
    square_pad: bool = field(default=False, metadata={"help": "the exercise's padded square frame"})
    mix: str | None = field(default=None, metadata={"help": "general SFT JSON mixed in against forgetting"})
    mix_ratio: float = field(default=0.15, metadata={"help": "fraction of the training set taken from --mix"})
    eval_data_path: str | None = field(default=None, metadata={"help": "SFT-format eval file (eval loss)"})
    eval_rec: list[str] = field(default_factory=list, metadata={"help": "REC jsonl files scored after training"})
    eval_limit: int | None = field(default=None, metadata={"help": "expressions per eval split"})
    model_max_length: int = 2048
    max_slice_nums: int | None = None


@dataclass
class GroundingTrainingArguments(SFTTrainingArguments):
    output_dir: str | None = field(default="output/mllm_grounding")
    yesno_eval_samples: int = field(default=0)  # grounding answers are boxes, not yes/no


def prepare_data(data_args: GroundingDataArguments, output_dir: Path, seed: int, main_process: bool = True) -> str:
    """The training JSON: `data_path` as given, or freshly prepared from the annotation files (by the main
    process only; the caller makes the others wait)."""
    from mllm.data.grounding_prepare import PrepareOptions, prepare

    if data_args.data_path:
        return data_args.data_path
    if not data_args.rec and not data_args.flickr:
        raise ValueError("give --rec / --flickr annotation files or a prepared --data_path")
    out = output_dir / "grounding_train.json"
    if not main_process:
        return str(out)
    options = PrepareOptions(tasks=tuple(t.strip() for t in data_args.tasks.split(",") if t.strip()),
                             style=data_args.style, templates=data_args.templates, square_pad=data_args.square_pad,
                             padded_dir=output_dir / "padded_images", seed=seed)
    prepare(out, data_args.rec, data_args.flickr, Path(data_args.image_folder), options,
            Path(data_args.mix) if data_args.mix else None, data_args.mix_ratio if data_args.mix else 0.0)
    return str(out)


def train_grounding(model_args: ModelArguments, data_args: GroundingDataArguments,
                    training_args: SFTTrainingArguments, callbacks: list | None = None) -> dict:
    """Prepare (if needed), fine-tune, and score `eval_rec`; returns `sft.train`'s dict plus "grounding_eval"."""
    from mllm.train.sft import train

    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with training_args.main_process_first(desc="grounding data"):
        data_path = prepare_data(data_args, output_dir, training_args.seed, training_args.process_index == 0)
    result = train(model_args, DataArguments(data_path=data_path, eval_data_path=data_args.eval_data_path,
                                             image_folder=data_args.image_folder,
                                             max_slice_nums=data_args.max_slice_nums,
                                             model_max_length=data_args.model_max_length),
                   training_args, callbacks)
    result["grounding_eval"] = None
    if data_args.eval_rec and result["model_dir"] and training_args.process_index == 0:
        from mllm.eval.grounding import evaluate_model, format_table

        shutil.rmtree(output_dir / "grounding_eval", ignore_errors=True)  # answers of an earlier model
        evaluation = evaluate_model(result["model_dir"], [Path(p) for p in data_args.eval_rec],
                                    output_dir / "grounding_eval", Path(data_args.image_folder), data_args.style,
                                    data_args.square_pad, limit=data_args.eval_limit, draw=8, quiet=True)
        print(format_table(evaluation))
        result["grounding_eval"] = {"splits": evaluation["splits"], "overall": evaluation["overall"]}
    return result


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, GroundingDataArguments, GroundingTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    result = train_grounding(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(json.dumps({k: result[k] for k in ("model_dir", "train_metrics", "eval_metrics", "grounding_eval")},
                         indent=2, default=str))
    return 0


# ---- the course's grounding stage -------------------------------------------------------------------------------

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

    Budget attributes read (with defaults, so an older `Budget` works): grounding_steps (default half of
    base_steps: 325 for the full course, 20 for `--quick`), grounding_batch (32, capped at base_batch),
    grounding_lr (1e-4), grounding_mix (0.15), grounding_turns (1: one question per conversation),
    grounding_tune_vision / grounding_tune_resampler (True), grounding_minutes (13: the cosine schedule runs
    to whichever comes first, grounding_steps or these minutes of training, so the whole stage, two
    evaluations included, fits in 20 minutes on 2 busy cores), eval_limit (None: all 1079 expressions).
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
    steps = int(_budget(budget, "grounding_steps", max(10, _budget(budget, "base_steps", 1200) // 2)))
    batch = int(_budget(budget, "grounding_batch", min(32, _budget(budget, "base_batch", 32))))
    # 1e-4, not 1e-3: unfrozen at >= 5e-4 the tiny model's vision side collapses to image-independent output
    # (the base recipe's probe; grounding pilots from 1e-3 ended with one box for every image)
    lr = float(_budget(budget, "grounding_lr", 1e-4))
    mix_ratio = float(_budget(budget, "grounding_mix", 0.15))
    turns = int(_budget(budget, "grounding_turns", 1))
    minutes = float(_budget(budget, "grounding_minutes", 13.0))  # training wall-clock cap
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
        "train_minutes": round(train_minutes, 1),
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


if __name__ == "__main__":
    sys.exit(main())
