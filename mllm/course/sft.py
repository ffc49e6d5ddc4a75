"""`mllm course --stage sft`: SFT of the base model on the yes/no set; test loss and accuracy before and after."""

from __future__ import annotations

from pathlib import Path

from mllm.course.shared import Budget, answer_yesno, fresh, test_loss, world_dir


def stage_sft(out: Path, budget: Budget, seed: int) -> dict:
    from mllm.train.sft import DataArguments, ModelArguments, SFTTrainingArguments, train

    world = world_dir(out, budget, seed)
    base = out / "base" / "model"
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: run the base stage first (mllm course --stage base)")
    stage = out / "sft"
    stage.mkdir(parents=True, exist_ok=True)
    before = {"test_loss": test_loss(base, world / "yesno_test.json", world),
              **answer_yesno(base, world, fresh(stage / "before"), limit=budget.eval_limit)}
    train(ModelArguments(model_name_or_path=str(base)),
          DataArguments(data_path=str(world / "yesno_train.json"), eval_data_path=str(world / "yesno_test.json"),
                        image_folder=str(world), model_max_length=512),
          SFTTrainingArguments(output_dir=str(stage / "model"), max_steps=budget.sft_steps,
                               per_device_train_batch_size=budget.sft_batch, learning_rate=budget.sft_lr,
                               lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.1, adam_beta2=0.95,
                               logging_steps=10, eval_strategy="steps", eval_steps=max(budget.sft_steps // 3, 1),
                               per_device_eval_batch_size=32, save_strategy="no", seed=seed,
                               yesno_eval_samples=64))
    after = {"test_loss": test_loss(stage / "model", world / "yesno_test.json", world),
             **answer_yesno(stage / "model", world, fresh(stage / "after"), limit=budget.eval_limit)}
    return {"stage": "sft", "model_dir": str(stage / "model"), "before": before, "after": after}
