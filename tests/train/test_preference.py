"""Preference training on the tiny checkpoint: the step-0 values, the reference check, rewards that move,
gradient accumulation, LoRA save / reload and resume."""

import json
import math
import shutil

import pytest
import torch
from transformers import TrainerCallback

from mllm.cli.train_preference import main
from mllm.data.preference_dataset import PreferenceCollator, PreferenceDataset
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer
from mllm.train.logp import StaleCacheError, compute_reference_logps, model_fingerprint
from mllm.train.preference import (LOGP_KEYS, REWARD_KEYS, PreferenceDataArguments, PreferenceTrainer,
                                   PreferenceTrainingArguments, ReferenceMismatchError, train)
from mllm.train.sft import ModelArguments

LN2 = math.log(2)


@pytest.fixture(scope="module")
def data(preference_data, tiny_checkpoint, tmp_path_factory):
    """The pairs with the tiny checkpoint's reference log-probs cached next to them."""
    root = tmp_path_factory.mktemp("pref_train")
    shutil.copy(preference_data / "pairs.json", root / "pairs.json")
    compute_reference_logps(tiny_checkpoint, root / "pairs.json", preference_data, batch_size=6, progress=False)
    return root / "pairs.json"


def run_args(model, data, image_folder, out, **overrides):
    model_kw = {k: overrides.pop(k) for k in list(overrides) if k in ModelArguments.__dataclass_fields__}
    training = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=3, learning_rate=1e-3,
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                    use_cpu=True, disable_tqdm=True, seed=0)
    training.update(overrides)
    return (ModelArguments(str(model), **model_kw), PreferenceDataArguments(str(data), image_folder=str(image_folder)),
            PreferenceTrainingArguments(**training))


class Snapshots(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), self.before[n])}
        assert self.trainable and changed == self.trainable


@pytest.mark.parametrize("loss_type, expected", [("sigmoid", LN2), ("nca_pair", 2 * LN2)])
def test_step_zero_rewards_are_zero_and_the_loss_is_known(tiny_checkpoint, preference_data, data, tmp_path,
                                                          monkeypatch, loss_type, expected):
    seen = []
    record = PreferenceTrainer._record
    monkeypatch.setattr(PreferenceTrainer, "_record", lambda self, values: seen.append(values) or record(self, values))
    result = train(*run_args(tiny_checkpoint, data, preference_data, tmp_path, max_steps=1, loss_type=loss_type,
                             per_device_train_batch_size=6))
    (values,) = seen
    assert values["rewards/chosen"].abs().max().item() < 1e-5
    assert values["rewards/rejected"].abs().max().item() < 1e-5
    (first,) = [h for h in result["log_history"] if "loss" in h]
    assert first["loss"] == pytest.approx(expected, abs=1e-5)
    assert first["rewards/accuracies"] == 0.0  # strict r_w > r_l
    assert first["reference_check/max_abs_diff"] < 1e-4
    assert set(REWARD_KEYS + LOGP_KEYS) <= set(first)
    assert first["logps/chosen"] == pytest.approx(first["logps/ref_chosen"], abs=1e-4)


def test_mismatched_reference_stops_before_training(tiny_checkpoint, other_checkpoint, preference_data, tmp_path):
    pairs = tmp_path / "pairs.json"
    shutil.copy(preference_data / "pairs.json", pairs)
    path = compute_reference_logps(other_checkpoint, pairs, preference_data, progress=False)
    with pytest.raises(StaleCacheError, match="model fingerprint differs"):  # caught by the fingerprint first
        train(*run_args(tiny_checkpoint, pairs, preference_data, tmp_path / "a"))
    # a cache whose header claims the right model (e.g. weights changed where the fast fingerprint does not look)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0]) | {"model_fingerprint": model_fingerprint(tiny_checkpoint)}
    path.write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    with pytest.raises(ReferenceMismatchError, match="step 0: the policy's log-probs differ"):
        train(*run_args(tiny_checkpoint, pairs, preference_data, tmp_path / "b"))
    assert not (tmp_path / "b" / "model.safetensors").exists()


def test_a_few_steps_raise_reward_accuracy_and_margins(tiny_checkpoint, preference_data, data, tmp_path):
    snaps = Snapshots()
    result = train(*run_args(tiny_checkpoint, data, preference_data, tmp_path, max_steps=8, logging_steps=2,
                             per_device_train_batch_size=6, sft_weight=0.1), callbacks=[snaps])
    windows = [h for h in result["log_history"] if "rewards/margins" in h]
    assert len(windows) == 4
    assert windows[-1]["rewards/accuracies"] == 1.0 and windows[-1]["rewards/margins"] > 0.1
    assert windows[-1]["rewards/margins"] > windows[0]["rewards/margins"]
    assert windows[-1]["loss"] < windows[0]["loss"]
    assert windows[-1]["logps/rejected"] < windows[-1]["logps/ref_rejected"]
    assert (tmp_path / "reward_curves.png").stat().st_size > 1000 and result["reward_curves"]
    assert result["final_metrics"]["rewards/accuracies"] == 1.0


def test_gradient_accumulation_gives_the_same_step(tiny_checkpoint, preference_data, data, tmp_path):
    """One optimizer step over 4 pairs: batch 4, or 2 micro-batches of 2 (the loss is a mean over pairs)."""
    common = dict(max_steps=1, optim="sgd", learning_rate=1.0, tune_vision=False, tune_resampler=False)
    whole = train(*run_args(tiny_checkpoint, data, preference_data, tmp_path / "a", per_device_train_batch_size=4,
                            **common))["model"].state_dict()
    split = train(*run_args(tiny_checkpoint, data, preference_data, tmp_path / "b", per_device_train_batch_size=2,
                            gradient_accumulation_steps=2, **common))["model"].state_dict()
    start = MLLMModel.from_pretrained(tiny_checkpoint).state_dict()
    moved = max((whole[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3
    for name in start:
        torch.testing.assert_close(split[name], whole[name], atol=1e-5, rtol=0, msg=name)


def test_lora_through_the_cli_saves_reloads_and_resumes(tiny_checkpoint, preference_data, data, tmp_path):
    from peft import PeftModel

    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_checkpoint), "--data_path", str(data), "--image_folder",
            str(preference_data), "--output_dir", str(out), "--use_lora", "true", "--lora_r", "4", "--lora_alpha", "8",
            "--tune_vision", "false", "--max_steps", "4", "--per_device_train_batch_size", "3", "--learning_rate",
            "5e-3", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--logging_steps", "1",
            "--save_strategy", "steps", "--save_steps", "2", "--loss_type", "sigmoid", "--use_average_logp", "true"]
    assert main(argv) == 0
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "checkpoint-2").is_dir()
    merged = MLLMModel.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(MLLMModel.from_pretrained(tiny_checkpoint), str(out / "adapter")).eval()
    tokenizer = load_tokenizer(out)
    ds = PreferenceDataset.from_config(data, tokenizer, merged.config, preference_data)
    batch = PreferenceCollator()([ds[i] for i in range(3)])
    batch.pop("labels"), batch.pop("idx")  # (no reference keys: the dataset was built without the cache)
    with torch.no_grad():
        expected = adapted(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)
        base = MLLMModel.from_pretrained(tiny_checkpoint).eval()(**batch).logits
    assert not torch.allclose(base, expected, atol=1e-4)

    # resume from checkpoint-2: the step-0 check is skipped (the policy has moved), steps 3 and 4 run
    shutil.rmtree(out / "checkpoint-4", ignore_errors=True)
    assert main(argv + ["--resume_from_checkpoint", "auto"]) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [h["step"] for h in state["log_history"] if "loss" in h][-2:] == [3, 4]


def test_a_missing_reference_cache_is_computed_first(tiny_checkpoint, preference_data, data, tmp_path):
    """No `mllm logp` by hand: training computes the cache, and it equals the one `mllm logp` writes."""
    pairs = tmp_path / "pairs.json"
    shutil.copy(preference_data / "pairs.json", pairs)
    result = train(*run_args(tiny_checkpoint, pairs, preference_data, tmp_path / "out", max_steps=1))
    made = result["reference_path"]
    assert made.endswith(".logp.jsonl") and (tmp_path / made.split("/")[-1]).is_file()
    lines = (tmp_path / made.split("/")[-1]).read_text().splitlines()
    expected = data.parent / made.split("/")[-1]  # the fixture's cache of the same pairs, computed by hand
    ref = {json.loads(l)["idx"]: json.loads(l) for l in expected.read_text().splitlines()[1:]}
    got = {json.loads(l)["idx"]: json.loads(l) for l in lines[1:]}
    assert set(got) == set(ref)
    for key in ref:
        assert got[key]["chosen_logp"] == pytest.approx(ref[key]["chosen_logp"], abs=1e-4)


def test_a_question_first_model_gets_its_image_after_the_question(tiny_checkpoint, preference_data):
    """The pairs' questions carry no image key: a model trained with the question first (its config's
    `question_first`) gets the image after the question on both sides, as its chat puts it; others before it."""
    tokenizer = load_tokenizer(tiny_checkpoint)
    config = MLLMModel.from_pretrained(tiny_checkpoint).config
    question = tokenizer.encode("Describe the image in detail.", add_special_tokens=False)[1:]  # past the first word
    image_after_question = {}
    for question_first in (False, True):
        config.question_first = question_first
        sample = PreferenceDataset.from_config(preference_data / "pairs.json", tokenizer, config, preference_data)[0]
        for side in ("chosen", "rejected"):
            ids, start = sample[f"{side}_input_ids"].tolist(), int(sample[f"{side}_image_bound"][0, 0])
            at = next(i for i in range(len(ids)) if ids[i:i + len(question)] == question)
            image_after_question[question_first, side] = at < start
    assert image_after_question == {(False, "chosen"): False, (False, "rejected"): False,
                                    (True, "chosen"): True, (True, "rejected"): True}


def test_an_open_rejected_answer_scores_no_end_token(tiny_checkpoint, preference_data, tmp_path):
    """`"rejected_open": true` (a rejected answer cut right after its error): the end token is not a target on the
    rejected side; the chosen side and a pair without the flag keep it."""
    tokenizer = load_tokenizer(tiny_checkpoint)
    config = MLLMModel.from_pretrained(tiny_checkpoint).config
    pairs = json.loads((preference_data / "pairs.json").read_text())[:2]
    pairs[0]["rejected_open"] = True
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    dataset = PreferenceDataset.from_config(tmp_path / "pairs.json", tokenizer, config, preference_data)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    last_target = {}
    for i in range(2):
        for side in ("chosen", "rejected"):
            labels = dataset[i][f"{side}_labels"]
            last_target[i, side] = int(labels[labels != -100][-1])
    assert last_target[0, "chosen"] == last_target[1, "chosen"] == last_target[1, "rejected"] == end
    assert last_target[0, "rejected"] != end
    word = tokenizer.encode(" " + pairs[0]["rejected"].split(" ")[-1], add_special_tokens=False)[-1]
    assert last_target[0, "rejected"] == word  # the answer's own last word is still scored
