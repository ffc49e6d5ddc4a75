"""`SFTTrainer`: Hugging Face `Trainer` with our loss, plus small callbacks.

The Trainer subclass overrides `compute_loss` only; the math lives in `mllm.train.losses`.

Loss normalisation across gradient accumulation and data parallelism (the "GA / DDP equivalence"):
the Trainer counts the target tokens of the whole optimizer step, over all accumulated micro-batches (and,
with `average_tokens_across_devices`, the default, over all processes), and passes that count as
`num_items_in_batch`. `compute_loss` returns sum(token NLL of this micro-batch) / num_items_in_batch, times the
number of processes (DDP averages gradients over processes; the factor turns that average back into a sum).
The Trainer then does not divide by the accumulation steps again (it treats a loss normalised by
`num_items_in_batch` as already scaled when `model_accepts_loss_kwargs` is set, which `SFTTrainer` sets
explicitly). The gradient of one optimizer step is therefore the gradient of the token-mean loss of all its
samples, whatever the micro-batch split: 2 processes x batch b == 1 process x batch b x accumulation 2.
Without a count (e.g. a direct call), the loss is the micro-batch token mean.

Labels are pre-shifted; `compute_loss` never shifts (see `mllm.data.conversation`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from mllm.jsonio import write_json_atomic
from mllm.model.modeling_mllm import MLLMModel
from mllm.train.losses import sft_loss

logger = logging.getLogger(__name__)
MODULE_GROUPS = ("vpm", "resampler", "llm")


class SFTTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss below consumes `num_items_in_batch`; make the Trainer count it and trust the scaling,
        # whatever it guessed from the model's forward signature.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)  # the Trainer reads `labels` from its dict again after this call
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = sft_loss(outputs.logits, labels, num_items=num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages over processes: undo it
        return (loss, outputs) if return_outputs else loss


# ---- reporting -------------------------------------------------------------------------------------------------

def _group(name: str) -> str:
    """Top-level module of a parameter name, with PEFT's `base_model.model.` prefix removed."""
    name = name.removeprefix("base_model.model.")
    return name.split(".", 1)[0]


def trainable_parameter_table(model: torch.nn.Module) -> str:
    """A text table of trainable / total parameters per module (vpm, resampler, llm, others).

    Under PEFT, the model's own parameters are counted once (a `modules_to_save` module is counted as its
    trainable copy, not also as the frozen original it shadows) and LoRA's A/B matrices are a row of their own,
    outside the model's total, so "all" is the model's size with or without adapters."""
    counts: dict[str, list[int]] = {}
    adapters = [0, 0]
    for name, p in model.named_parameters():
        if ".original_module." in name:  # PEFT keeps the frozen original beside the trained copy
            continue
        row = adapters if ".lora_" in name else counts.setdefault(_group(name), [0, 0])
        row[0] += p.numel() if p.requires_grad else 0
        row[1] += p.numel()
    order = [g for g in MODULE_GROUPS if g in counts] + sorted(g for g in counts if g not in MODULE_GROUPS)
    total = [sum(r[0] for r in counts.values()), sum(r[1] for r in counts.values())]
    rows = [(g, counts[g]) for g in order] + [("all", total)] + ([("lora", adapters)] if adapters[1] else [])
    lines = [f"{'module':<12}{'trainable':>14}{'total':>14}{'%':>8}"]
    for group, (trainable, size) in rows:
        lines.append(f"{group:<12}{trainable:>14,}{size:>14,}{100 * trainable / max(size, 1):>8.2f}")
    return "\n".join(lines)


# ---- loading -------------------------------------------------------------------------------------------------

def load_model_for_training(model_dir: str, dtype: torch.dtype, training_args) -> MLLMModel:
    """The model to train. Under DeepSpeed ZeRO-3 transformers builds it already partitioned over the processes
    (`deepspeed.zero.Init`, so no process holds all weights), which needs DeepSpeed's communication set up first:
    on the CPU the Trainer's own setup leaves that to the engine, which comes too late."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        _ = training_args.device  # the Trainer's process-group setup (torchrun's environment)
        deepspeed.init_distributed(dist_backend=training_args.ddp_backend or None)
    return MLLMModel.from_pretrained(model_dir, dtype=dtype)


# ---- callbacks -------------------------------------------------------------------------------------------------

class TokenizerIntoCheckpointCallback(TrainerCallback):
    """Write the tokenizer into each `checkpoint-N` folder (the model's save_pretrained writes config.json and
    the weights, PEFT the adapter), so a checkpoint loads as a model folder. The tokenizer is not handed to the
    Trainer as `processing_class`, whose special-token alignment would rewrite the LLM config's pad/bos/eos ids
    (a pad id freezes that embedding row in every later stage)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not folder.is_dir():
            return
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(folder))


# ---- runs and checkpoints: resume the right work, never another run's --------------------------------------------
RUN_FILE = "run.json"  # in output_dir: what this run is (model, data, every setting that changes the result)
COMPLETE_FILE = "checkpoint_complete.json"  # in checkpoint-N: written after the Trainer finished saving it
# TrainingArguments that change what a run computes (the rest: where and how often it logs and saves).
RESULT_ARGUMENTS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                    "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
                    "seed", "data_seed", "per_device_train_batch_size", "gradient_accumulation_steps", "bf16",
                    "fp16", "optim", "label_smoothing_factor", "gradient_checkpointing", "deepspeed")


class RunMismatchError(ValueError):
    """output_dir holds another run; resuming it would train (or finish) the wrong thing."""


def _file_identity(path: str | os.PathLike) -> dict:
    """Path and a hash of name, size and both ends (`hash_file_ends`): cheap on large files."""
    import hashlib

    from mllm.model.checkpoint import hash_file_ends

    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]  # a datasets folder
    if not path.exists() or not files:
        return {"path": str(path.resolve()), "missing": True}
    digest = hashlib.sha256()
    for file in files:
        hash_file_ends(file, digest)
    return {"path": str(path.resolve()), "sha256_ends": digest.hexdigest()[:16]}


def run_identity(*argument_groups, data_paths: tuple = ()) -> dict:
    """What a training run is: its model and data arguments, the data files' contents, and every training
    argument that changes the result (`RESULT_ARGUMENTS` plus the fields our TrainingArguments subclasses add)."""
    import dataclasses

    from transformers import TrainingArguments

    base_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    identity: dict = {}
    for group in argument_groups:
        for f in dataclasses.fields(group):
            if isinstance(group, TrainingArguments) and f.name in base_fields and f.name not in RESULT_ARGUMENTS:
                continue
            if f.name in ("overwrite_output_dir", "yesno_eval_samples", "yesno_max_new_tokens"):
                continue
            value = getattr(group, f.name)
            identity[f.name] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    identity["data_files"] = [_file_identity(p) for p in data_paths if p]
    return identity


def _identity_hash(identity: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def claim_run_dir(output_dir: str | os.PathLike, identity: dict, overwrite: bool = False) -> str:
    """Record `identity` in output_dir/run.json; refuse (RunMismatchError, naming what differs) an output_dir
    that holds another run or unmarked checkpoints, unless `overwrite`. Returns the run's hash."""
    import shutil

    output_dir = Path(output_dir)
    run_file = output_dir / RUN_FILE
    if overwrite and output_dir.is_dir():  # the user asked to start afresh: drop the old run's checkpoints only
        for old in output_dir.glob("checkpoint-*"):
            if old.is_dir():
                shutil.rmtree(old)
    if not overwrite and output_dir.is_dir():
        if run_file.is_file():
            found = json.loads(run_file.read_text()).get("identity", {})
            changed = sorted(k for k in set(found) | set(identity) if found.get(k) != identity.get(k))
            if changed:
                raise RunMismatchError(
                    f"{output_dir} holds another run (different {', '.join(changed)}); resuming it would continue "
                    "that run. Choose another output_dir, or pass --overwrite_output_dir to start afresh there")
        elif any(output_dir.glob("checkpoint-*")):
            raise RunMismatchError(f"{output_dir} holds checkpoints of a run this version cannot identify; choose "
                                   "another output_dir, or pass --overwrite_output_dir to start afresh there")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_file, {"run": _identity_hash(identity), "identity": identity})
    return _identity_hash(identity)


class CompleteCheckpointCallback(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written all of it (model, optimizer, scheduler,
    state, RNG): a checkpoint cut short by a kill or a full disk has no mark and is never resumed from."""

    def __init__(self, run_hash: str | None = None):
        self.run_hash = run_hash

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
                     if p.is_file() and p.name != COMPLETE_FILE}
            write_json_atomic(folder / COMPLETE_FILE, {"run": self.run_hash, "global_step": state.global_step,
                                                      "files": files})


def checkpoint_is_complete(folder: str | os.PathLike, run_hash: str | None = None) -> bool:
    """Marked complete (of this run, when `run_hash` is given), and every file it listed still has its size."""
    folder = Path(folder)
    try:
        mark = json.loads((folder / COMPLETE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if run_hash is not None and mark.get("run") not in (None, run_hash):
        return False
    files = mark.get("files", {})
    return bool(files) and all((folder / name).is_file() and (folder / name).stat().st_size == size
                               for name, size in files.items())


def last_checkpoint(output_dir: str | os.PathLike, run_hash: str | None = None) -> str | None:
    """The newest COMPLETE `checkpoint-N` of output_dir (of this run, given its hash), or None (also when the
    folder does not exist yet: a first run with `resume_from_checkpoint="auto"` starts fresh)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    numbered = []
    for folder in output_dir.glob("checkpoint-*"):
        suffix = folder.name.removeprefix("checkpoint-")
        if suffix.isdigit() and folder.is_dir():
            numbered.append((int(suffix), folder))
    for _, folder in sorted(numbered, reverse=True):
        if checkpoint_is_complete(folder, run_hash):
            return str(folder)
        logger.warning("%s is incomplete (no %s, or files changed since): not resuming from it", folder,
                       COMPLETE_FILE)
    return None


def resume_point(training_args, identity: dict) -> tuple[str | None, CompleteCheckpointCallback]:
    """Claim output_dir for this run and resolve `resume_from_checkpoint` ("auto": the newest complete
    checkpoint of this run); returns it with the callback that marks this run's checkpoints complete."""
    overwrite = bool(getattr(training_args, "overwrite_output_dir", False))
    run_hash = claim_run_dir(training_args.output_dir, identity, overwrite) if training_args.process_index == 0 \
        else _identity_hash(identity)
    resume = training_args.resume_from_checkpoint
    if resume == "auto":
        resume = None if overwrite else last_checkpoint(training_args.output_dir, run_hash)
    return resume, CompleteCheckpointCallback(run_hash)


class TrainingClock(TrainerCallback):
    """Minutes a run has trained, across stops and resumes: each `checkpoint-N` records the minutes it took to
    reach (training_minutes.json), a run that resumes from a checkpoint starts its clock there, and the end of
    training writes the total into output_dir. Work redone after a stop (steps past the last checkpoint) counts
    once. Create it right before `train()`: the clock starts then."""

    FILE = "training_minutes.json"

    def __init__(self, output_dir: str | os.PathLike):
        last = last_checkpoint(output_dir)
        saved = Path(last) / self.FILE if last else None
        self.prior = json.loads(saved.read_text())["minutes"] if saved is not None and saved.is_file() else 0.0
        self.started = time.time()

    def minutes(self) -> float:
        return self.prior + (time.time() - self.started) / 60

    def _write(self, folder: Path, state) -> None:
        if state.is_world_process_zero and folder.is_dir():
            write_json_atomic(folder / self.FILE, {"minutes": self.minutes(), "global_step": state.global_step})

    def on_save(self, args, state, control, **kwargs):
        self._write(Path(args.output_dir) / f"checkpoint-{state.global_step}", state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(Path(args.output_dir), state)


class YesNoAccuracyCallback(TrainerCallback):
    """At each evaluation, greedily answer the first `max_samples` yes/no questions of the eval records and
    log `eval_yesno_accuracy` (the exercise's rule: the target "Yes"/"No" is a substring of the answer)."""

    def __init__(self, trainer: Trainer, records: list[dict], image_folder: str | os.PathLike, processor,
                 max_samples: int = 64, batch_size: int = 8, max_new_tokens: int = 8):
        self.trainer = trainer
        self.items = yesno_items(records, image_folder)[:max_samples]
        self.processor = processor
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def on_evaluate(self, args, state, control, **kwargs):
        if not self.items or not state.is_world_process_zero:
            return  # other ranks go on and wait for rank 0 at the next collective
        if zero_stage(self.trainer) == 3:
            # rank 0 alone cannot run a model whose parameters are partitioned over all ranks
            logger.warning("yes/no generation is skipped under DeepSpeed ZeRO-3; score the saved model with "
                           "`mllm answer` + `mllm eval yesno` instead")
            return
        model = self.trainer.model
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        accuracy = yesno_accuracy(model, self.processor, self.items, self.batch_size, self.max_new_tokens)
        self.trainer.log({"eval_yesno_accuracy": accuracy})


def zero_stage(trainer: Trainer) -> int:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def yesno_items(records: list[dict], image_folder: str | os.PathLike) -> list[dict]:
    """Single-image two-turn records whose answer is Yes or No -> {image, question, target}."""
    items = []
    for r in records:
        conv, image = r.get("conversations") or [], r.get("image")
        if len(conv) != 2 or not isinstance(image, str) or conv[1].get("content", "").strip() not in ("Yes", "No"):
            continue
        question = conv[0]["content"].replace("<image>", "").strip()
        items.append({"image": str(Path(image_folder) / image), "question": question,
                      "target": conv[1]["content"].strip()})
    return items


def yesno_accuracy(model, processor, items: list[dict], batch_size: int = 8, max_new_tokens: int = 8) -> float:
    """Fraction of items whose greedy answer contains the target (case-sensitive substring)."""
    from mllm.eval.yesno import score
    from mllm.model.generation import GenerationSettings, build_chat_prompt, generate
    from mllm.model.image_processing import load_image

    was_training = model.training
    model.eval()
    records = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts, images = [], []
            for item in chunk:
                text, ordered = build_chat_prompt([{"role": "user", "content": item["question"]}],
                                                  processor.tokenizer, images=[load_image(item["image"])],
                                                  question_first=model.config.question_first)
                prompts.append(text)
                images.append(ordered)
            answers = generate(model, processor(prompts, images), processor.tokenizer,
                               GenerationSettings("greedy", max_new_tokens=max_new_tokens))
            records += [{"answer": a, "target": it["target"], "image": it["image"]} for a, it in zip(answers, chunk)]
    finally:
        model.train(was_training)
    return score(records)["overall"]["exercise_accuracy"]


class LossCurveCallback(TrainerCallback):
    """At the end of training, plot train and eval loss against the step into `output_dir/loss_curve.png`."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss_curve(state.log_history, Path(args.output_dir) / "loss_curve.png")


def plot_loss_curve(log_history: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {key: [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
              for key in ("loss", "eval_loss")}
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        if series[key]:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if key == "eval_loss" else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (token mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
