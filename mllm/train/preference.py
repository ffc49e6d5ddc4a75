"""`mllm train preference`: preference alignment (DPO family) against cached reference log-probs.

    mllm train preference --model_name_or_path DIR --data_path pairs.json --image_folder IMGS \\
        [--loss_type nca_pair|sigmoid|ipo] [--beta 0.1] [--use_average_logp true] [--sft_weight 0.0] \\
        [--use_lora true] [--output_dir output/mllm_preference_training] ...

From Python: `train(ModelArguments(...), PreferenceDataArguments(...), PreferenceTrainingArguments(...))` returns
{"model_dir", "adapter_dir", "model", "train_metrics", "final_metrics", "log_history", "reference_path",
"reward_curves", "trainer"}; `model_dir` loads with `MLLMModel.from_pretrained` (LoRA merged in).

Design choices:
- The reference model never runs during training: its log-probs come from the `mllm logp` cache, refused if
  its fingerprint (model, data file, dtype, slicing, max length) does not match this run. A cache that is absent
  or unfinished is computed (or finished) first, as `mllm logp` would, by the main process; a stale one is never
  overwritten: that stays the user's call (`mllm logp --on_stale recompute`).
- Step-0 check: on the first training batch of a fresh run the policy IS the reference, so its own log-prob
  sums must equal the cached ones; a difference above `reference_check_tolerance` stops training with a message
  (a stale or mismatched cache, another template, dtype or image setting) instead of training on a mismatch.
  Resumed runs skip it (the policy has moved by then). With bf16 autocast, loosen the tolerance.
- `PreferenceTrainer` overrides `compute_loss` (one forward of the concatenated chosen + rejected batch,
  `token_logps`, `preference_loss` from `mllm.train.losses`) and `log` (adds the window's mean rewards and
  log-probs: TRL's names `rewards/{chosen,rejected,margins,accuracies}`, `logps/{chosen,rejected}`,
  `logps/{ref_chosen,ref_rejected}`; accuracy is strict r_w > r_l, so it is 0 at step 0 (up to float noise when
  the reference pass padded a pair differently); the logps are those the loss uses, sums or token means).
  The loss is a mean over pairs; the Trainer divides it by the accumulation steps, and DDP averages over
  processes, so an optimizer step sees the mean over all its pairs.
- loss "ipo" always uses token-averaged log-probs (its definition); the others use sums unless
  `use_average_logp` (the exercise's provided script sets it).
- Freezing, LoRA, activation checkpointing, DeepSpeed, checkpoints, resume and the final save are the SFT
  stage's (`mllm.train.sft`). A reward-curve PNG is written to output_dir/reward_curves.png at the end.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from mllm.data.preference_dataset import REFERENCE_KEYS, PreferenceCollator, PreferenceDataset
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer
from mllm.train.logp import cache_path, compute_reference_logps, load_reference_logps, read_cache
from mllm.train.losses import (PREFERENCE_LOSSES, masked_token_mean_nll, preference_loss, token_logps,
                               uses_average_logp)
from mllm.train.sft import DTYPES, ModelArguments, prepare_model, save_final
from mllm.train.trainer import (RunMismatchError, TokenizerIntoCheckpointCallback, load_model_for_training, resume_point, run_identity,
                                trainable_parameter_table)

logger = logging.getLogger(__name__)
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
LOGP_KEYS = ("logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected")


class ReferenceMismatchError(RuntimeError):
    """At step 0 the policy's log-probs differ from the cached reference ones."""


@dataclass
class PreferenceDataArguments:
    data_path: str = field(metadata={"help": "preference JSON: [{idx, question, chosen, rejected, image_path|image}]"})
    image_folder: str = field(default=".", metadata={"help": "folder the records' image_path values are relative to"})
    ref_name: str = field(default="ref", metadata={"help": "reference cache {stem}.{ref_name}.logp.jsonl"})
    reference_logp_path: str | None = field(default=None, metadata={
        "help": "reference log-prob cache (default: next to the data file, named by ref_name)"})
    max_slice_nums: int | None = field(default=None, metadata={"help": "max slices per image (overrides the config)"})
    model_max_length: int = field(default=2048, metadata={"help": "max tokens per answer sequence (images never cut)"})


@dataclass
class PreferenceTrainingArguments(TrainingArguments):
    output_dir: str | None = field(default="output/mllm_preference_training")
    report_to: None | str | list[str] = field(default="tensorboard")
    logging_steps: float = field(default=10)
    remove_unused_columns: bool = field(default=False)  # our inputs are lists, not dataset columns
    beta: float = field(default=0.1, metadata={"help": "reward scale: r = beta (logp - logp_ref); IPO's tau"})
    loss_type: str = field(default="nca_pair", metadata={"help": "preference loss", "choices": list(PREFERENCE_LOSSES)})
    use_average_logp: bool = field(default=False, metadata={
        "help": "token-mean log-probs instead of sums (the exercise's script sets it; ipo always uses means)"})
    sft_weight: float = field(default=0.0, metadata={"help": "weight of a token-mean NLL term on the chosen answers"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start afresh in an output_dir that holds another run (its checkpoints are removed)"})
    reference_check_tolerance: float = field(default=1e-3, metadata={
        "help": "step 0: max |policy - reference| log-prob sum before stopping (negative: no check)"})


# ---- trainer -----------------------------------------------------------------------------------------------------

class PreferenceTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-pair mean and ignores num_items_in_batch: let the Trainer divide by the
        # accumulation steps (it would not if it believed the loss was normalised by a token count).
        self.model_accepts_loss_kwargs = False
        self._window: dict[str, list[float]] = defaultdict(list)
        self._reference_checked = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        idx = inputs.pop("idx", None)
        ref = {key: inputs.pop(key, None) for key in REFERENCE_KEYS}
        if any(v is None for v in ref.values()):
            raise ValueError("the batch has no reference log-probs; build the dataset with the `mllm logp` cache")
        outputs = model(**inputs)
        per_token, sums, avgs = token_logps(outputs.logits, labels)  # (2B, L), (2B,), (2B,)
        pairs = sums.shape[0] // 2  # rows [0, B) chosen, [B, 2B) rejected
        if model.training and not self._reference_checked:
            self._check_reference(sums.detach(), ref, idx)
        average = uses_average_logp(args.loss_type, args.use_average_logp)
        policy = avgs if average else sums
        ref_chosen = ref["ref_chosen_avg_logps" if average else "ref_chosen_logps"]
        ref_rejected = ref["ref_rejected_avg_logps" if average else "ref_rejected_logps"]
        losses, chosen_rewards, rejected_rewards = preference_loss(policy[:pairs], policy[pairs:], ref_chosen,
                                                                   ref_rejected, args.beta, args.loss_type)
        loss = losses.mean()
        if args.sft_weight:
            loss = loss + args.sft_weight * masked_token_mean_nll(per_token[:pairs], labels[:pairs])
        if model.training:
            self._record({"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                          "rewards/margins": chosen_rewards - rejected_rewards,
                          "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                          "logps/chosen": policy[:pairs].detach(), "logps/rejected": policy[pairs:].detach(),
                          "logps/ref_chosen": ref_chosen.to(policy.device),
                          "logps/ref_rejected": ref_rejected.to(policy.device)})
        return (loss, outputs) if return_outputs else loss

    def _check_reference(self, sums: torch.Tensor, ref: dict, idx) -> None:
        self._reference_checked = True
        tolerance = self.args.reference_check_tolerance
        if self.state.global_step > 0 or tolerance < 0:  # resumed: the policy has already moved
            return
        pairs = sums.shape[0] // 2
        cached = torch.cat([ref["ref_chosen_logps"], ref["ref_rejected_logps"]]).to(sums.device)  # (2B,)
        diff = (sums.float() - cached).abs()
        self._window["reference_check/max_abs_diff"].append(float(diff.max()))
        if float(diff.max()) > tolerance:
            worst = int(diff.argmax())
            side, pair = ("chosen", worst) if worst < pairs else ("rejected", worst - pairs)
            name = idx[pair] if idx is not None else pair
            raise ReferenceMismatchError(
                f"step 0: the policy's log-probs differ from the cached reference log-probs by up to "
                f"{float(diff.max()):.4g} (pair idx {name!r}, {side}: policy {float(sums[worst]):.4f}, cache "
                f"{float(cached[worst]):.4f}; tolerance {tolerance}). At step 0 the policy is the reference, so the "
                "cache was computed with another model, template, dtype or image setting. Recompute it with "
                "`mllm logp --model <the model being trained> ... --on_stale recompute`; nothing was trained.")

    def _record(self, values: dict[str, torch.Tensor]) -> None:
        """Keep this micro-batch's per-pair values (all processes) for the current logging window."""
        stacked = torch.stack([values[k].float() for k in values])  # (K, B)
        stacked = self.accelerator.gather(stacked.T.contiguous()).T  # (K, B * processes)
        for key, row in zip(values, stacked.cpu()):
            self._window[key].extend(row.tolist())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window:  # a training log: add the window's means, start a new window
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._window.items()}}
            self._window.clear()
        super().log(logs, start_time)


# ---- reward curves -----------------------------------------------------------------------------------------------

class RewardCurveCallback(TrainerCallback):
    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_reward_curves(state.log_history, Path(args.output_dir) / "reward_curves.png")


def plot_reward_curves(log_history: list[dict], path: Path) -> Path | None:
    """Rewards, margin, accuracy, loss and policy log-probs against the step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in log_history if "rewards/chosen" in h]
    if not rows:
        return None
    steps = [h["step"] for h in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        axes[0].plot(steps, [h[key] for h in rows], label=key.split("/")[1])
    axes[0].axhline(0.0, color="grey", lw=0.5)
    axes[0].set_title("rewards  beta (logp - logp_ref)")
    axes[1].plot(steps, [h["rewards/accuracies"] for h in rows], label="accuracy (r_w > r_l)", color="tab:green")
    axes[1].plot(steps, [h["loss"] for h in rows], label="loss", color="tab:red")
    axes[1].set_title("reward accuracy and loss")
    for key, style in (("logps/chosen", "-"), ("logps/rejected", "-"), ("logps/ref_chosen", ":"),
                       ("logps/ref_rejected", ":")):
        axes[2].plot(steps, [h[key] for h in rows], style, label=key.split("/")[1])
    axes[2].set_title("log-probs (policy, reference)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- training ----------------------------------------------------------------------------------------------------

def train(model_args: ModelArguments, data_args: PreferenceDataArguments, training_args: PreferenceTrainingArguments,
          callbacks: list | None = None) -> dict:
    """Align, save; see the module docstring for the returned dict."""
    set_seed(training_args.seed)
    model = load_model_for_training(model_args.model_name_or_path, DTYPES[model_args.model_dtype], training_args)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    config = model.config
    if data_args.max_slice_nums is not None:
        config.slice.max_slice_nums = data_args.max_slice_nums
    reference_path = Path(data_args.reference_logp_path or cache_path(data_args.data_path, data_args.ref_name))
    settings = {"dtype": model_args.model_dtype, "max_slice_nums": config.slice.max_slice_nums,
                "model_max_length": data_args.model_max_length}
    with training_args.main_process_first(desc="reference log-probs"):
        header, done, _ = read_cache(reference_path)
        if header is None or len(done) < header.get("pairs", 0):
            print(f"reference log-probs: {'finishing' if header else 'computing'} {reference_path} with "
                  f"{model_args.model_name_or_path} (as `mllm logp` would)")
            compute_reference_logps(model_args.model_name_or_path, data_args.data_path, data_args.image_folder,
                                    data_args.ref_name, batch_size=training_args.per_device_train_batch_size,
                                    out=reference_path, max_slice_nums=config.slice.max_slice_nums,
                                    model_max_length=data_args.model_max_length, dtype=model_args.model_dtype,
                                    device=str(training_args.device), progress=not training_args.disable_tqdm)
    _, reference = load_reference_logps(reference_path, model_args.model_name_or_path, data_args.data_path, settings)
    dataset = PreferenceDataset.from_config(data_args.data_path, tokenizer, config, data_args.image_folder,
                                            data_args.max_slice_nums, data_args.model_max_length, reference)
    model = prepare_model(model, model_args)
    trainer = PreferenceTrainer(model=model, args=training_args, train_dataset=dataset,
                                data_collator=PreferenceCollator(pad_id=tokenizer.pad_token_id or 0),
                                callbacks=[TokenizerIntoCheckpointCallback(tokenizer), RewardCurveCallback(),
                                           *(callbacks or [])])
    if trainer.is_world_process_zero():
        print(f"trainable parameters of {model_args.model_name_or_path}:\n{trainable_parameter_table(model)}")
        print(f"data: {len(dataset):,} pairs, format {dataset.format_name} (detected) from {data_args.data_path}; "
              f"reference log-probs from {reference_path}")
    resume, completion = resume_point(training_args, run_identity(
        model_args, data_args, training_args, data_paths=(data_args.data_path,)))
    trainer.add_callback(completion)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    saved = save_final(trainer, trainer.model, config, tokenizer, Path(training_args.output_dir))
    logged = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    curves = Path(training_args.output_dir) / "reward_curves.png"
    return {**saved, "train_metrics": result.metrics, "final_metrics": logged[-1] if logged else {},
            "log_history": trainer.state.log_history, "reference_path": str(reference_path),
            "reward_curves": str(curves) if curves.is_file() else None, "trainer": trainer}
