"""SupervisedDataset (records, images, skipping and reporting) and the collator."""

import json

import pytest
import torch
from PIL import Image

from mllm.data.collate import SupervisedCollator
from mllm.data.sft_dataset import BadImageError, SupervisedDataset
from mllm.model.image_processing import ImageProcessor
from mllm.model.tokenization import build_tokenizer

QUESTION = "Is there a red circle in the image? Please answer yes or no."
Q = 4  # resampler queries per view


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([QUESTION, "Yes", "No", "a red circle", "system user assistant"] * 20, vocab_size=300)


def record(i, image, answer="Yes", question=f"<image>\n{QUESTION}"):
    rec = {"id": i, "conversations": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


def make(tmp_path, tok, records, **kwargs):
    (tmp_path / "img").mkdir(exist_ok=True)
    for name, size in (("small.png", (56, 56)), ("wide.png", (112, 56))):
        Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "img" / name)
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    processor = ImageProcessor(max_slice_nums=2, scale_resolution=56, patch_size=14)
    return SupervisedDataset(path, tok, processor, Q, image_folder=tmp_path, **kwargs)


def test_samples_line_up_images_and_spans(tmp_path, tok):
    ds = make(tmp_path, tok, [record(0, "img/small.png"), record(1, "img/wide.png"),
                              record(2, {"<image_00>": "img/small.png", "<image_01>": "img/wide.png"},
                                     question=f"<image_01> {QUESTION} <image_00>"), record(3, None, question="hi")])
    assert len(ds) == 4
    small, wide, multi, text = ds[0], ds[1], ds[2], ds[3]
    assert len(small["pixel_values"]) == 1 and small["tgt_sizes"].tolist() == [[4, 4]]
    assert len(wide["pixel_values"]) == 3  # sliced 2x1: source view + 2 slices
    assert wide["tgt_sizes"].dtype == torch.int32
    # wide image first (its key comes first in the text), then the small one
    assert multi["tgt_sizes"].tolist() == wide["tgt_sizes"].tolist() + small["tgt_sizes"].tolist()
    for s in (small, wide, multi):
        assert len(s["image_bound"]) == len(s["pixel_values"])
        assert ((s["image_bound"][:, 1] - s["image_bound"][:, 0]) == Q).all()
        unk = tok.convert_tokens_to_ids("<unk>")
        for a, b in s["image_bound"].tolist():
            assert (s["input_ids"][a:b] == unk).all()
            assert (s["labels"][a - 1:b] == -100).all()  # image tokens are never targets
    assert text["pixel_values"] == [] and text["image_bound"].shape == (0, 2)


def test_missing_image_names_record_path_and_file(tmp_path, tok):
    records = [record(0, "img/small.png"), record("rec-7", "img/nope.png")]
    with pytest.raises(BadImageError) as err:
        make(tmp_path, tok, records)
    message = str(err.value)
    assert "rec-7" in message and "img/nope.png" in message and "train.json" in message


def test_broken_image_fails_and_skip_mode_counts(tmp_path, tok):
    records = [record(0, "img/small.png"), record(1, "img/nope.png"), record(2, "img/broken.png")]
    with pytest.raises(BadImageError, match="broken.png"):
        make(tmp_path, tok, [records[0], records[2]])
    ds = make(tmp_path, tok, records, skip_bad_images=True)
    assert len(ds) == 1
    assert [i for i, _ in ds.report["bad_images"]] == [1, 2]
    assert "2 with bad images" in ds.summary()


def test_no_target_and_too_long_samples_are_skipped_and_reported(tmp_path, tok):
    long_text = " ".join([QUESTION] * 8)
    records = [record(0, "img/small.png"),
               record(1, "img/small.png", question="<image>\n" + long_text),  # image early, reply late
               record(2, "img/wide.png", question=long_text + "\n<image>")]  # image late
    probe = make(tmp_path, tok, records)
    limit = len(probe[0]["input_ids"])  # record 0 fits exactly
    assert int(probe[1]["image_bound"][-1, 1]) < limit < len(probe[1]["input_ids"])
    assert int(probe[2]["image_bound"][-1, 1]) >= limit
    ds = make(tmp_path, tok, records, model_max_length=limit)
    assert ds.report["no_target"] == [1]  # the reply of record 1 was cut away
    assert ds.report["too_long"] == [2]  # cutting would split the wide image: skipped, never cut
    assert [r["id"] for r in ds.records] == [0]
    assert "without target tokens (ids [1])" in ds.summary()


def test_truncation_never_splits_an_image(tmp_path, tok):
    records = [record(0, "img/wide.png", question="<image>\n" + " ".join([QUESTION] * 3))]
    full = make(tmp_path, tok, records)[0]
    image_end = int(full["image_bound"][-1, 1])
    for limit in range(image_end - 3, len(full["input_ids"]) + 1):
        ds = make(tmp_path, tok, records, model_max_length=limit)
        if len(ds):
            s = ds[0]
            assert len(s["input_ids"]) <= limit
            assert len(s["image_bound"]) == 3 and int(s["image_bound"][-1, 1]) < len(s["input_ids"])
        else:
            assert ds.report["too_long"] + ds.report["no_target"] == [0]


def test_collator_pads_right_and_masks_by_length():
    features = [
        {"input_ids": torch.tensor([5, 0, 7]), "labels": torch.tensor([-100, 7, -100]), "pixel_values": [],
         "tgt_sizes": torch.zeros(0, 2, dtype=torch.int32), "image_bound": torch.zeros(0, 2, dtype=torch.long)},
        None,  # a skipped sample
        {"input_ids": torch.tensor([9]), "labels": torch.tensor([4]), "pixel_values": [torch.zeros(3, 14, 14)],
         "tgt_sizes": torch.tensor([[1, 1]], dtype=torch.int32), "image_bound": torch.tensor([[0, 1]])},
    ]
    batch = SupervisedCollator(pad_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 0, 7], [9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]  # the inner id 0 is a real token
    assert batch["labels"].tolist() == [[-100, 7, -100], [4, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert [len(p) for p in batch["pixel_values"]] == [0, 1]
    assert batch["image_bound"][1].tolist() == [[0, 1]] and batch["tgt_sizes"][0].shape == (0, 2)


def test_iteration_ends_and_out_of_range_index_raises(tmp_path, tok):
    """Samplers that iterate the dataset (e.g. transformers' length grouping) must see it end."""
    dataset = make(tmp_path, tok, [record(0, "img/small.png"), record(1, "img/wide.png")])
    assert len(list(iter(dataset))) == 2
    with pytest.raises(IndexError):
        dataset[2]


def test_a_question_first_model_gets_its_image_after_the_question(tmp_path, tok):
    """`from_config` of a model trained with the question first (its config's `question_first`) places the data's
    "<image>\\n" + question image after the question, as the model's own chat does; other models keep it first."""
    from mllm.model.configuration import MLLMConfig

    make(tmp_path, tok, [record(0, "img/small.png")])  # writes the image and train.json
    config = MLLMConfig.from_preset("tiny")
    config.slice.max_slice_nums, config.slice.scale_resolution, config.query_num = 1, 56, Q
    question = tok.encode("\n" + QUESTION, add_special_tokens=False)
    image_after_question = {}
    for question_first in (False, True):
        config.question_first = question_first
        sample = SupervisedDataset.from_config(tmp_path / "train.json", tok, config, image_folder=tmp_path)[0]
        ids, (start, end) = sample["input_ids"].tolist(), sample["image_bound"][0].tolist()
        at = next(i for i in range(len(ids)) if ids[i:i + len(question)] == question)  # the question's tokens
        image_after_question[question_first] = at < start
        assert end - start == Q
    assert image_after_question == {False: False, True: True}
