"""Smoke training of the tiny model: loss falls, exactly the trainable parameters change, checkpoints reload
with the same logits, resume reproduces an uninterrupted run, and evaluation logs what it should."""

import json

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import TrainerCallback

from mllm.cli.main import main as cli
from mllm.cli.train_sft import main
from mllm.data.collate import SupervisedCollator
from mllm.data.sft_dataset import SupervisedDataset
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer
from mllm.train.sft import DataArguments, ModelArguments, SFTTrainingArguments, train

QUESTION = "Is there a purple triangle in the image? Please answer yes or no."  # words of conftest's CORPUS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Other processes share this machine's 2 cores; two OpenMP threads then stall each other at every barrier
    (measured ~30x slower per step), one thread does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 yes/no records on 56-112 px images (red circle -> Yes, blue square -> No), plus a 2-turn text record."""
    root = tmp_path_factory.mktemp("sft_data")
    (root / "img").mkdir()
    records = []
    for i in range(8):
        image = Image.new("RGB", (56 + 14 * (i % 5), 56), "white")
        draw = ImageDraw.Draw(image)
        yes = i % 2 == 0
        (draw.ellipse if yes else draw.rectangle)((8, 8, 44, 44), fill="red" if yes else "blue")
        image.save(root / "img" / f"{i}.png")
        records.append({"id": i, "image": f"img/{i}.png", "conversations": [
            {"role": "user", "content": f"<image>\n{QUESTION}"},
            {"role": "assistant", "content": "Yes" if yes else "No"}]})
    records.append({"id": "text", "conversations": [
        {"role": "user", "content": "How many circles are there?"}, {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "Describe the image in detail."}, {"role": "assistant", "content": "Yes"}]})
    (root / "train.json").write_text(json.dumps(records))
    (root / "test.json").write_text(json.dumps(records[:4]))
    return root


class Snapshots(TrainerCallback):
    """Parameter values (and trainability) when training begins and ends, as the Trainer's model names them."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}

    def check(self):
        assert self.trainable
        for name, before in self.before.items():
            changed = not torch.equal(before, self.after[name])
            assert changed == (name in self.trainable), f"{name}: trainable={name in self.trainable}, changed={changed}"


def args(data, out, **overrides):
    model_kw = {k: overrides.pop(k) for k in list(overrides) if k in ModelArguments.__dataclass_fields__}
    data_kw = {k: overrides.pop(k) for k in list(overrides) if k in DataArguments.__dataclass_fields__}
    training = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=3, learning_rate=2e-3,
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                    use_cpu=True, disable_tqdm=True, seed=0, yesno_eval_samples=0)
    training.update(overrides)
    return (ModelArguments(model_kw.pop("model_name_or_path"), **model_kw),
            DataArguments(str(data / "train.json"), image_folder=str(data), **data_kw),
            SFTTrainingArguments(**training))


def logits_of(model, folder, data):
    tokenizer = load_tokenizer(folder)
    ds = SupervisedDataset.from_config(data / "test.json", tokenizer, model.config, image_folder=data)
    batch = SupervisedCollator()([ds[i] for i in range(len(ds))])
    batch.pop("labels")
    with torch.no_grad():
        return model.eval()(**batch).logits


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def test_full_tuning_saves_reloads_evaluates_and_logs(tiny_checkpoint, data, tmp_path, capsys):
    snaps = Snapshots()
    result = train(*args(data, tmp_path / "out", model_name_or_path=str(tiny_checkpoint),
                         eval_data_path=str(data / "test.json"), eval_strategy="steps", eval_steps=3,
                         save_strategy="steps", save_steps=3, yesno_eval_samples=4, report_to="tensorboard"),
                   callbacks=[snaps])
    snaps.check()
    assert len(snaps.trainable) == len(snaps.before)  # everything trains
    curve = losses(result["log_history"])
    assert curve[-1] < curve[0] * 0.7, curve
    printed = capsys.readouterr().out
    assert "resampler" in printed and "trainable" in printed  # the per-module parameter table

    # evaluation: eval loss and generated yes/no accuracy in the history and in TensorBoard
    accuracies = [h["eval_yesno_accuracy"] for h in result["log_history"] if "eval_yesno_accuracy" in h]
    assert len(accuracies) == 2 and all(0.0 <= a <= 1.0 for a in accuracies)
    assert "eval_loss" in result["eval_metrics"] and "eval_yesno_accuracy" in result["eval_metrics"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (tmp_path / "out" / "runs").iterdir()  # transformers v5: output_dir/runs/<date_host>
    events = EventAccumulator(str(run_dir)).Reload()
    assert {"eval/yesno_accuracy", "eval/loss", "train/loss"} <= set(events.Tags()["scalars"])
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 1000

    # the final folder and a mid-run checkpoint both reload and reproduce the trained model's logits
    expected = logits_of(result["model"], tmp_path / "out", data)
    reloaded = MLLMModel.from_pretrained(result["model_dir"])
    torch.testing.assert_close(logits_of(reloaded, result["model_dir"], data), expected, atol=1e-5, rtol=1e-5)
    mid = MLLMModel.from_pretrained(tmp_path / "out" / "checkpoint-3")
    load_tokenizer(tmp_path / "out" / "checkpoint-3")
    assert not torch.equal(mid.resampler.query, reloaded.resampler.query)


def test_frozen_vision_and_cosine_schedule_through_the_cli(tiny_checkpoint, data, tmp_path):
    snaps = Snapshots()
    # the CLI path: argv -> HfArgumentParser -> train (callbacks injected through the module for the test)
    import mllm.train.sft as sft

    original = sft.train
    sft.train = lambda m, d, t: original(m, d, t, callbacks=[snaps])
    try:
        code = main(["--model_name_or_path", str(tiny_checkpoint), "--data_path", str(data / "train.json"),
                     "--image_folder", str(data), "--tune_vision", "false", "--output_dir", str(tmp_path / "out"),
                     "--max_steps", "4", "--per_device_train_batch_size", "3", "--learning_rate", "2e-3",
                     "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--save_strategy", "no",
                     "--lr_scheduler_type", "cosine", "--logging_steps", "1"])
    finally:
        sft.train = original
    assert code == 0
    snaps.check()
    assert not any(n.startswith("vpm.") for n in snaps.trainable)
    assert any(n.startswith("resampler.") for n in snaps.trainable)
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert losses(history)[-1] < losses(history)[0]
    rates = [h["learning_rate"] for h in history if "learning_rate" in h]
    assert len(rates) == 4 and all(a > b for a, b in zip(rates, rates[1:]))  # the cosine schedule is real


def test_lora_trains_adapters_and_saved_modules_and_merges(tiny_checkpoint, data, tmp_path):
    from peft import PeftModel

    snaps = Snapshots()
    result = train(*args(data, tmp_path / "out", model_name_or_path=str(tiny_checkpoint), use_lora=True,
                         lora_r=4, lora_alpha=8, lora_dropout=0.0, tune_vision=False, learning_rate=5e-3,
                         save_strategy="steps", save_steps=6),
                   callbacks=[snaps])
    snaps.check()
    trainable = snaps.trainable
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert all(".o_proj." not in n and ".mlp." not in n for n in trainable)  # only q/k/v get LoRA
    assert any("resampler.modules_to_save" in n for n in trainable)
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert not any(".vpm." in n for n in trainable)
    assert losses(result["log_history"])[-1] < losses(result["log_history"])[0]

    merged = result["model"]
    assert type(merged) is MLLMModel
    expected = logits_of(merged, result["model_dir"], data)
    reloaded = MLLMModel.from_pretrained(result["model_dir"])
    torch.testing.assert_close(logits_of(reloaded, result["model_dir"], data), expected, atol=1e-5, rtol=1e-5)
    # base + saved adapter (unmerged) gives the same logits as the merged export
    adapted = PeftModel.from_pretrained(MLLMModel.from_pretrained(tiny_checkpoint), result["adapter_dir"])
    torch.testing.assert_close(logits_of(adapted, result["model_dir"], data), expected, atol=1e-4, rtol=1e-4)

    # at inference: --adapter takes the adapter folder or the LoRA run's checkpoint-N as it is
    from mllm.model.loading import load_pretrained

    for adapter in (result["adapter_dir"], tmp_path / "out" / "checkpoint-6"):
        model, _, _ = load_pretrained(tiny_checkpoint, adapter=adapter)
        torch.testing.assert_close(logits_of(model, result["model_dir"], data), expected, atol=1e-4, rtol=1e-4)
    # `mllm merge` writes a plain checkpoint with the same logits, and never writes into a non-empty folder
    merge = ["merge", "--model", str(tiny_checkpoint), "--adapter", str(result["adapter_dir"]),
             "--out", str(tmp_path / "merged")]
    assert cli(merge) == 0
    merged_again = MLLMModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits_of(merged_again, tmp_path / "merged", data), expected, atol=1e-4, rtol=1e-4)
    assert cli(merge) == 2


class CheckpointingFlags(TrainerCallback):
    """Whether the LLM's layers and the vision tower's run under activation checkpointing when training begins."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.seen = {"llm": base.llm.model.gradient_checkpointing, "vision": base.vpm.gradient_checkpointing}


@pytest.mark.parametrize("setup", [dict(tune_llm=False), dict(use_lora=True, lora_modules_to_save="", lora_r=4)],
                         ids=["frozen_llm", "lora_frozen_embeddings"])
def test_activation_checkpointing_keeps_the_math(tiny_checkpoint, data, tmp_path, setup):
    """Same losses with and without checkpointing, also when the embeddings are frozen (an input-grad hook
    would make the embedding output a leaf that the image scatter cannot write into)."""
    runs = {}
    for checkpointing in (False, True):
        snaps, flags = Snapshots(), CheckpointingFlags()
        run_args = args(data, tmp_path / str(checkpointing), max_steps=3, lora_dropout=0.0,
                        model_name_or_path=str(tiny_checkpoint), activation_checkpointing=checkpointing, **setup)
        runs[checkpointing] = train(*run_args, callbacks=[snaps, flags])
        snaps.check()
        # switched on by the Trainer's own --activation_checkpointing, in the LLM and in the vision tower
        assert flags.seen == {"llm": checkpointing, "vision": checkpointing}
    assert losses(runs[True]["log_history"]) == pytest.approx(losses(runs[False]["log_history"]), abs=1e-5)


class StopAt(TrainerCallback):
    """Counts the optimizer steps this run really executes; stops training after step `step`."""

    def __init__(self, step=None):
        self.step, self.executed = step, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.executed += 1
        if self.step is not None and state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_resume_matches_an_uninterrupted_run(tiny_checkpoint, data, tmp_path, use_lora):
    common = dict(model_name_or_path=str(tiny_checkpoint), max_steps=4, save_strategy="steps", save_steps=2,
                  per_device_train_batch_size=2, lr_scheduler_type="linear", use_lora=use_lora, lora_r=4,
                  lora_alpha=8, lora_dropout=0.0, tune_vision=not use_lora)
    straight = train(*args(data, tmp_path / "a", **common))
    train(*args(data, tmp_path / "b", **common), callbacks=[StopAt(2)])  # "crashes" after saving step 2
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "checkpoint-4").exists()
    counter = StopAt()
    resumed = train(*args(data, tmp_path / "b", resume_from_checkpoint="auto", **common), callbacks=[counter])
    assert resumed["trainer"].state.global_step == 4 and counter.executed == 2  # steps 3 and 4 only
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)
    assert losses(resumed["log_history"])[-2:] == pytest.approx(losses(straight["log_history"])[-2:], abs=1e-6)


def test_last_checkpoint_is_none_for_a_missing_folder_and_the_newest_otherwise(tmp_path):
    from mllm.train.trainer import last_checkpoint

    assert last_checkpoint(tmp_path / "not-yet") is None  # resume_from_checkpoint="auto" on a first run
    assert last_checkpoint(tmp_path) is None
    for step in (2, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x" * step)
    assert last_checkpoint(tmp_path) is None  # none was marked complete by the Trainer's save
    from mllm.train.trainer import COMPLETE_FILE

    for step in (2, 10, 9):
        mark = {"run": "r1", "files": {"model.safetensors": step}}
        (tmp_path / f"checkpoint-{step}" / COMPLETE_FILE).write_text(__import__("json").dumps(mark))
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-10" / "model.safetensors").write_bytes(b"x")  # cut short after the mark: not complete
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-9")
    assert last_checkpoint(tmp_path, run_hash="r2") is None  # checkpoints of another run never count


def test_parameter_table_counts_the_model_once_under_lora(tiny_checkpoint):
    from mllm.train.sft import prepare_model
    from mllm.train.trainer import trainable_parameter_table

    model = MLLMModel.from_pretrained(tiny_checkpoint)
    size = sum(p.numel() for p in model.parameters())
    embed = model.llm.get_input_embeddings().weight.numel()
    lora = prepare_model(model, ModelArguments(model_name_or_path=str(tiny_checkpoint), use_lora=True, lora_r=4,
                                               lora_alpha=8, tune_vision=False, tune_resampler=False))
    rows = {line.split()[0]: [int(v.replace(",", "")) for v in line.split()[1:3]]
            for line in trainable_parameter_table(lora).splitlines()[1:]}
    assert rows["all"] == [embed, size]  # the model's own size; only the saved embeddings train
    adapters = sum(p.numel() for n, p in lora.named_parameters() if ".lora_" in n)
    assert rows["lora"] == [adapters, adapters] and adapters > 0


def test_bf16_autocast_on_the_cpu_follows_the_fp32_loss_curve(tiny_checkpoint, data, tmp_path):
    """`--bf16` through the Trainer on the CPU (autocast: bf16 matmuls, fp32 master weights): the same run's
    losses stay within 1 % of float32 step by step (measured: within 0.25 %), and the weights stay float32."""
    runs = {}
    for bf16 in (False, True):
        run_args = args(data, tmp_path / str(bf16), max_steps=8, learning_rate=1e-3,
                        model_name_or_path=str(tiny_checkpoint), bf16=bf16)
        runs[bf16] = train(*run_args)
    fp32, lowp = losses(runs[False]["log_history"]), losses(runs[True]["log_history"])
    print("fp32", [round(v, 4) for v in fp32], "\nbf16", [round(v, 4) for v in lowp])
    assert len(fp32) == len(lowp) == 8
    assert fp32[-1] < fp32[0]  # it trains
    for a, b in zip(fp32, lowp):
        assert abs(a - b) <= 0.01 * a, (fp32, lowp)
    assert lowp != fp32  # bf16 really ran (bit-identical losses would mean autocast was off)
    assert all(p.dtype == torch.float32 for p in runs[True]["model"].parameters())


def test_in_run_yes_no_samples_follow_the_models_question_first(tiny_checkpoint, data, monkeypatch):
    """The trainer's yes/no samples are asked as the model's chat asks: a model trained with the question first
    gets the image after the question."""
    from mllm.model import generation
    from mllm.model.loading import load_pretrained
    from mllm.train.trainer import yesno_accuracy, yesno_items

    model, tokenizer, processor = load_pretrained(tiny_checkpoint)
    items = yesno_items(json.loads((data / "test.json").read_text()), data)[:2]
    prompts = []
    monkeypatch.setattr(generation, "generate", lambda model, inputs, *a: prompts.append(inputs["input_ids"]) or
                        ["Yes"] * len(inputs["input_ids"]))
    question = tokenizer.encode("Please answer yes or no.", add_special_tokens=False)
    image_start = tokenizer.convert_tokens_to_ids("<image>")
    for question_first in (False, True):
        model.config.question_first = question_first
        assert yesno_accuracy(model, processor, items) == 0.5  # items 0 and 1: Yes and No
        ids = prompts[-1][0].tolist()
        at = next(i for i in range(len(ids)) if ids[i:i + len(question)] == question)
        assert (at < ids.index(image_start)) == question_first
