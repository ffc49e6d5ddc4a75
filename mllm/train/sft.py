"""`mllm train sft`: supervised fine-tuning on the exercise's `data/train.json` format.

    mllm train sft --model_name_or_path DIR --data_path train.json [--eval_data_path test.json] \\
        [--image_folder .] [--tune_vision false] [--use_lora true] [--output_dir output/mllm_sft_training] ...

Every option of the three typed dataclasses below is a flag (`HfArgumentParser`); a single .json / .yaml
argument is read as a file of options. From Python, later stages call

    result = train(ModelArguments(...), DataArguments(...), SFTTrainingArguments(output_dir=..., ...))

which returns {"model_dir", "adapter_dir", "train_metrics", "eval_metrics", "log_history", "data_report",
"trainer", "model"}; `model_dir` (= output_dir) then holds config.json + model.safetensors + tokenizer files,
loadable with `MLLMModel.from_pretrained` + `load_tokenizer`.

Design choices:
- Freezing is explicit: tune_vision / tune_resampler / tune_llm. With use_lora, PEFT puts LoRA on the modules
  whose full name matches `lora_target_modules` (a regex, default the reference's LLM q/k/v) and trains whole
  copies of `lora_modules_to_save` plus vpm (if tune_vision) and resampler (if tune_resampler); tune_llm is
  ignored (LoRA adapts the LLM). The final folder holds the LoRA weights merged in (a plain MLLM checkpoint);
  the adapter itself goes to output_dir/adapter.
- Checkpoints are the Trainer's (model.safetensors of the state dict, or the PEFT adapter, plus optimizer,
  scheduler, RNG and trainer state); the model's own save writes config.json, a callback adds the tokenizer, so
  a full-weight checkpoint-N loads as a model folder and a LoRA one as `--adapter`. `--resume_from_checkpoint
  auto` picks the latest complete checkpoint of this run.
- transformers v5 always saves safetensors (there is no `save_safetensors` switch any more).
- Activation checkpointing is the Trainer's own `--activation_checkpointing` switch (non-reentrant by default,
  see `MLLMModel._activation_checkpointing_enable`).
- The tokenizer is not handed to the Trainer as `processing_class`: its special-token alignment would write the
  tokenizer's pad id into the LLM config (freezing that embedding row later); the checkpoint callback saves it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from mllm.data.collate import SupervisedCollator
from mllm.data.formats import DATA_FORMATS
from mllm.data.sft_dataset import SupervisedDataset
from mllm.model import checkpoint
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.processing import MLLMProcessor
from mllm.model.tokenization import load_tokenizer
from mllm.train.trainer import (TokenizerIntoCheckpointCallback, load_model_for_training, LossCurveCallback, SFTTrainer,
                                RunMismatchError, YesNoAccuracyCallback, plot_loss_curve, resume_point, run_identity,
                                trainable_parameter_table, zero_stage)

logger = logging.getLogger(__name__)
REFERENCE_LORA_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "model folder (config.json, safetensors, tokenizer)"})
    model_dtype: str = field(default="float32", metadata={"help": "weights dtype: float32, bfloat16, float16",
                                                          "choices": list(DTYPES)})
    tune_vision: bool = field(default=True, metadata={"help": "train the vision tower (vpm)"})
    tune_resampler: bool = field(default=True, metadata={"help": "train the resampler"})
    tune_llm: bool = field(default=True, metadata={"help": "train the LLM (ignored with use_lora)"})
    use_lora: bool = field(default=False, metadata={"help": "LoRA on lora_target_modules instead of full LLM tuning"})
    lora_r: int = 64
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_target_modules: str = field(default=REFERENCE_LORA_TARGETS,
                                     metadata={"help": "regex, fully matched against module names"})
    lora_modules_to_save: str = field(default="embed_tokens", metadata={
        "help": "comma-separated module names trained in full beside LoRA (vpm / resampler are added by "
                "tune_vision / tune_resampler); the reference uses embed_tokens"})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "training data: JSON / JSON lines (minicpmv, llava or sharegpt records) "
                                             "or a datasets save_to_disk folder / .parquet file(s)"})
    eval_data_path: str | None = field(default=None, metadata={"help": "evaluation data, any accepted format"})
    data_format: str = field(default="auto", metadata={
        "help": "record format of the data files; auto detects it per file from the first record",
        "choices": list(DATA_FORMATS)})
    image_folder: str = field(default=".", metadata={"help": "folder the records' image paths are relative to"})
    max_slice_nums: int | None = field(default=None, metadata={
        "help": "max slices per image; overrides (and is saved into) the model config"})
    model_max_length: int = field(default=2048, metadata={"help": "max tokens per sample (images never cut)"})
    skip_bad_images: bool = field(default=False, metadata={"help": "count and skip missing/broken images"})


@dataclass
class SFTTrainingArguments(TrainingArguments):
    output_dir: str | None = field(default="output/mllm_sft_training")
    report_to: None | str | list[str] = field(default="tensorboard")
    logging_steps: float = field(default=10)
    remove_unused_columns: bool = field(default=False)  # our inputs are lists, not dataset columns
    label_names: list[str] | None = field(default_factory=lambda: ["labels"])  # so evaluation computes a loss
    prediction_loss_only: bool = field(default=True)  # never gather [B, L, vocab] logits at evaluation
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start afresh in an output_dir that holds another run (its checkpoints are removed)"})
    yesno_eval_samples: int = field(default=64, metadata={
        "help": "yes/no questions of the eval set answered by greedy generation at each evaluation (0: off)"})
    yesno_max_new_tokens: int = field(default=8)


# ---- model -----------------------------------------------------------------------------------------------------

def prepare_model(model: MLLMModel, args: ModelArguments) -> torch.nn.Module:
    """Freeze / unfreeze per the flags, or wrap in PEFT LoRA; returns the model to train."""
    if not args.use_lora:
        model.set_trainable(vision=args.tune_vision, resampler=args.tune_resampler, llm=args.tune_llm)
        return model
    from peft import LoraConfig, get_peft_model

    to_save = [m.strip() for m in args.lora_modules_to_save.split(",") if m.strip()]
    to_save += [name for name, flag in (("vpm", args.tune_vision), ("resampler", args.tune_resampler)) if flag]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules, modules_to_save=list(dict.fromkeys(to_save)) or None)
    model.set_trainable(vision=False, resampler=False, llm=False)
    return get_peft_model(model, config)


def save_final(trainer: SFTTrainer, model: torch.nn.Module, config, tokenizer, output_dir: Path) -> dict:
    """Write a folder loadable by MLLMModel.from_pretrained (LoRA merged in) and, with LoRA, the adapter."""
    out = {"model_dir": str(output_dir), "adapter_dir": None, "model": None}
    if hasattr(model, "merge_and_unload") and zero_stage(trainer) == 3:
        # partitioned parameters cannot be merged on one rank: save the (gathered) adapter only
        trainer.save_model(str(output_dir / "adapter"))
        logger.warning("ZeRO-3: saved the LoRA adapter to %s/adapter; merge it into the base model with "
                       "PeftModel.from_pretrained(...).merge_and_unload() on one process", output_dir)
        return out | {"model_dir": None, "adapter_dir": str(output_dir / "adapter")}
    if hasattr(model, "merge_and_unload"):  # PEFT
        if trainer.is_world_process_zero():
            model.save_pretrained(str(output_dir / "adapter"))
            merged = model.merge_and_unload()
            merged.save_pretrained(output_dir, tokenizer=tokenizer)
            out.update(adapter_dir=str(output_dir / "adapter"), model=merged)
        return out
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathers ZeRO-3 shards (all ranks)
    if trainer.is_world_process_zero():
        checkpoint.save_state_dict(state, output_dir)
        config.save(output_dir)
        tokenizer.save_pretrained(str(output_dir))
        out["model"] = trainer.accelerator.unwrap_model(trainer.model)
    return out


# ---- training --------------------------------------------------------------------------------------------------

def train(model_args: ModelArguments, data_args: DataArguments, training_args: SFTTrainingArguments,
          callbacks: list | None = None) -> dict:
    """Fine-tune, evaluate, save; see the module docstring for the returned dict. `callbacks` are extra
    `TrainerCallback`s (e.g. a later stage's own logging)."""
    set_seed(training_args.seed)
    model = load_model_for_training(model_args.model_name_or_path, DTYPES[model_args.model_dtype], training_args)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    config = model.config
    if data_args.max_slice_nums is not None:
        config.slice.max_slice_nums = data_args.max_slice_nums
    model = prepare_model(model, model_args)

    def dataset(path):
        # image bytes of datasets data are written next to the run (content-hashed, shared by ranks and reruns)
        return SupervisedDataset.from_config(path, tokenizer, config, data_args.image_folder,
                                             data_args.max_slice_nums, data_args.model_max_length,
                                             data_args.skip_bad_images, data_args.data_format,
                                             Path(training_args.output_dir) / "data_images")

    train_ds = dataset(data_args.data_path)
    if len(train_ds) == 0:
        raise ValueError(f"no usable training record: {train_ds.summary()}")
    eval_ds = dataset(data_args.eval_data_path) if data_args.eval_data_path else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                         data_collator=SupervisedCollator(pad_id=pad_id),
                         callbacks=[TokenizerIntoCheckpointCallback(tokenizer), LossCurveCallback(),
                                    *(callbacks or [])])
    if eval_ds is not None and training_args.yesno_eval_samples > 0:
        trainer.add_callback(YesNoAccuracyCallback(
            trainer, eval_ds.records, data_args.image_folder, MLLMProcessor.from_config(tokenizer, config),
            max_samples=training_args.yesno_eval_samples, max_new_tokens=training_args.yesno_max_new_tokens))
    if trainer.is_world_process_zero():
        print(f"trainable parameters of {model_args.model_name_or_path}:\n{trainable_parameter_table(model)}")
        for ds in (train_ds, eval_ds):
            if ds is not None:
                print(ds.format_line())
                print(ds.summary())

    resume, completion = resume_point(training_args, run_identity(
        model_args, data_args, training_args, data_paths=(data_args.data_path, data_args.eval_data_path)))
    trainer.add_callback(completion)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    eval_metrics = {}
    if eval_ds is not None:
        if "eval_loss" not in final_eval_logs(trainer.state):  # not evaluated at the last step yet
            trainer.evaluate()
            if trainer.is_world_process_zero():
                plot_loss_curve(trainer.state.log_history, Path(training_args.output_dir) / "loss_curve.png")
        eval_metrics = final_eval_logs(trainer.state)
    saved = save_final(trainer, trainer.model, config, tokenizer, Path(training_args.output_dir))
    reports = {"train": train_ds.report | {"failed_at_load": train_ds.failed_at_load}}
    if eval_ds is not None:
        reports["eval"] = eval_ds.report | {"failed_at_load": eval_ds.failed_at_load}
    return {**saved, "train_metrics": result.metrics, "eval_metrics": eval_metrics,
            "log_history": trainer.state.log_history, "data_report": reports, "trainer": trainer}


def final_eval_logs(state) -> dict:
    """Every eval_* value logged at the last step (eval loss, yes/no accuracy...)."""
    return {k: v for h in state.log_history if h.get("step") == state.global_step
            for k, v in h.items() if k.startswith("eval_")}
