"""The reference log-prob cache: contents equal a direct computation, staleness is detected, a torn run resumes."""

import json
import math
import shutil

import pytest
import torch

from mllm.data.conversation import IGNORE_INDEX
from mllm.data.preference_dataset import PreferenceCollator, PreferenceDataset
from mllm.cli.logp import main
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import load_tokenizer
from mllm.train.logp import (StaleCacheError, cache_path, compute_reference_logps, load_reference_logps,
                             model_fingerprint, pair_logps, read_cache)
from mllm.train.losses import token_logps


@pytest.fixture()
def data(preference_data, tmp_path):
    """A private copy of the pairs (the cache is written next to the data file)."""
    shutil.copy(preference_data / "pairs.json", tmp_path / "pairs.json")
    return tmp_path / "pairs.json"


def compute(model, data, image_folder, **kwargs):
    return compute_reference_logps(model, data, image_folder, batch_size=4, progress=False, **kwargs)


def test_pair_logps_by_hand_with_preshifted_labels():
    # Vocabulary of 3; a concatenated batch of one pair: row 0 chosen, row 1 rejected. Labels are pre-shifted:
    # the target of logits[t] is labels[t], no further shift. logits (ln 2, 0, 0) -> p = (1/2, 1/4, 1/4).
    row = torch.tensor([[math.log(2), 0.0, 0.0]] * 4)  # (L=4, V=3), the same distribution at every position
    logits = torch.stack([row, row])  # (2, 4, 3)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1, IGNORE_INDEX],   # chosen: log 1/2 + log 1/4
                           [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]])  # rejected: log 1/4
    (entry,) = pair_logps(logits, labels, ["a"])
    assert entry["idx"] == "a"
    assert entry["chosen_logp"] == pytest.approx(math.log(1 / 8), abs=1e-6)
    assert entry["chosen_avg_logp"] == pytest.approx(math.log(1 / 8) / 2, abs=1e-6)
    assert entry["chosen_per_token_logp"] == pytest.approx([math.log(1 / 2), math.log(1 / 4)], abs=1e-6)
    assert entry["rejected_logp"] == pytest.approx(math.log(1 / 4), abs=1e-6)
    assert entry["rejected_per_token_logp"] == pytest.approx([math.log(1 / 4)], abs=1e-6)


def test_off_by_one_the_answer_is_scored_where_the_labels_say(tiny_checkpoint, preference_data):
    """labels[t] == input_ids[t + 1] on the reply (then <|im_end|>), and a model that puts all its mass on
    input_ids[t + 1] at position t scores log-prob 0: no second shift anywhere in the path."""
    tokenizer = load_tokenizer(tiny_checkpoint)
    model = MLLMModel.from_pretrained(tiny_checkpoint)
    ds = PreferenceDataset.from_config(preference_data / "pairs.json", tokenizer, model.config, preference_data)
    sample = ds[0]
    ids, labels = sample["chosen_input_ids"], sample["chosen_labels"]
    targets = (labels != IGNORE_INDEX).nonzero().flatten()
    answer = tokenizer.encode("\n" + ds.records[0]["chosen"], add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert labels[targets].tolist() == answer + [end]  # "\n", the reply, then <|im_end|>
    assert (labels[targets[:-1]] == ids[targets[:-1] + 1]).all()

    oracle = torch.full((1, len(ids), len(tokenizer)), -30.0)
    oracle[0, torch.arange(len(ids) - 1), ids[1:]] = 30.0  # position t predicts input_ids[t + 1]
    oracle[0, targets[-1], end] = 30.0
    _, total, _ = token_logps(oracle, labels[None])
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    shifted_again = labels[None, 1:]  # the wrong convention: shift the pre-shifted labels once more
    _, wrong, _ = token_logps(oracle[:, :-1], shifted_again)
    assert wrong.item() < -100


def test_cache_matches_direct_token_logps_and_is_reused(tiny_checkpoint, data, preference_data):
    path = compute(tiny_checkpoint, data, preference_data)
    assert path == cache_path(data, "ref") == data.with_name("pairs.ref.logp.jsonl")
    header, entries = load_reference_logps(path, tiny_checkpoint, data)
    assert header["model_fingerprint"] == model_fingerprint(tiny_checkpoint) and header["sum_or_avg"] == "both"
    assert header["pairs"] == 6 and sorted(entries) == [str(100 + i) for i in range(6)]

    # each pair alone, unpadded, through the model and token_logps
    tokenizer = load_tokenizer(tiny_checkpoint)
    model = MLLMModel.from_pretrained(tiny_checkpoint).eval()
    ds = PreferenceDataset.from_config(data, tokenizer, model.config, preference_data)
    for i in range(len(ds)):
        batch = PreferenceCollator()([ds[i]])
        labels, idx = batch.pop("labels"), batch.pop("idx")
        with torch.no_grad():
            per_token, total, avg = token_logps(model(**batch).logits, labels)
        entry = entries[str(idx[0])]
        assert entry["chosen_logp"] == pytest.approx(total[0].item(), abs=1e-4)
        assert entry["rejected_logp"] == pytest.approx(total[1].item(), abs=1e-4)
        assert entry["rejected_avg_logp"] == pytest.approx(avg[1].item(), abs=1e-5)
        assert entry["chosen_per_token_logp"] == pytest.approx(per_token[0][labels[0] != -100].tolist(), abs=1e-5)

    before = path.read_bytes()
    compute(tiny_checkpoint, data, preference_data)  # up to date: nothing recomputed, nothing rewritten
    assert path.read_bytes() == before


def test_stale_cache_is_refused_or_recomputed(tiny_checkpoint, other_checkpoint, data, preference_data, capsys):
    path = compute(tiny_checkpoint, data, preference_data)
    original = read_cache(path)[1]
    with pytest.raises(StaleCacheError, match="model fingerprint differs"):
        compute(other_checkpoint, data, preference_data)
    with pytest.raises(StaleCacheError, match="model fingerprint differs"):
        load_reference_logps(path, other_checkpoint, data)
    with pytest.raises(StaleCacheError, match="setting max_slice_nums"):
        compute(tiny_checkpoint, data, preference_data, max_slice_nums=1)

    records = json.loads(data.read_text())
    records[0]["chosen"] = "a blue square."
    data.write_text(json.dumps(records))
    with pytest.raises(StaleCacheError, match="data file differs"):
        load_reference_logps(path, tiny_checkpoint, data)
    assert main(["--model", str(tiny_checkpoint), "--data_path", str(data), "--image_folder",
                 str(preference_data)]) == 1
    assert "stale" in capsys.readouterr().err

    compute(tiny_checkpoint, data, preference_data, on_stale="recompute")
    header, entries = load_reference_logps(path, tiny_checkpoint, data)  # fresh again
    assert entries["100"]["chosen_logp"] != original["100"]["chosen_logp"]  # the changed answer
    assert entries["101"]["chosen_logp"] == pytest.approx(original["101"]["chosen_logp"], abs=1e-4)


def test_resume_after_a_torn_line_computes_only_what_is_missing(tiny_checkpoint, data, preference_data, monkeypatch):
    path = compute(tiny_checkpoint, data, preference_data)
    complete = path.read_text().splitlines()
    torn = "\n".join(complete[:3]) + "\n" + complete[3][:40]  # header, 2 pairs, half of the third
    path.write_text(torn)
    with pytest.raises(ValueError, match="only 2 of 6 pairs"):
        load_reference_logps(path, tiny_checkpoint, data)  # reading never changes the file
    assert path.read_text() == torn

    loaded = []
    original_getitem = PreferenceDataset.__getitem__
    monkeypatch.setattr(PreferenceDataset, "__getitem__",
                        lambda self, i: loaded.append(i) or original_getitem(self, i))
    assert main(["--model", str(tiny_checkpoint), "--data_path", str(data), "--image_folder",
                 str(preference_data), "--batch_size", "3"]) == 0
    assert loaded == [2, 3, 4, 5]
    resumed = path.read_text().splitlines()
    assert resumed[:3] == complete[:3] and len(resumed) == 7
    a, b = read_cache(path)[1], {json.loads(line)["idx"]: json.loads(line) for line in complete[1:]}
    for key, entry in b.items():
        assert a[str(key)]["rejected_logp"] == pytest.approx(entry["rejected_logp"], abs=1e-4)
