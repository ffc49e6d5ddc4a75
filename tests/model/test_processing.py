"""Placeholders, image_bound, padding and truncation of MLLMProcessor (facts sheet §5.1, §5.2, §6.4, §6.6)."""

import pytest
import torch
from PIL import Image

from mllm.model.image_processing import ImageProcessor
from mllm.model.processing import (
    IMAGE_MARKER, MLLMProcessor, expand_image_markers, find_image_bound, image_placeholder, sliced_image_ids,
)
from mllm.model.tokenization import build_tokenizer, special_token_ids

Q = 64
SIZES_AND_VIEWS = [((448, 448), 1), ((300, 200), 1), ((640, 480), 3), ((1000, 600), 3), ((2000, 500), 5),
                   ((1344, 1344), 10)]


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["What is in the image? Describe it.", "A cat on a box. Yes or no?", "numbers 0123456789"] * 5
    return build_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return MLLMProcessor(tokenizer, ImageProcessor(max_slice_nums=9, scale_resolution=448, patch_size=14), query_num=Q)


def _assert_bounds_on_unk_runs(input_ids, bounds, unk_id):
    covered = torch.zeros_like(input_ids, dtype=torch.bool)
    for start, end in bounds.tolist():
        assert end - start == Q
        assert (input_ids[start:end] == unk_id).all()
        covered[start:end] = True
    assert not (input_ids[~covered] == unk_id).any()  # every <unk> belongs to some span


def test_placeholder_text():
    assert image_placeholder(None, 2, 0) == "<image_id>0</image_id><image><unk><unk></image>"
    assert image_placeholder([2, 2], 1, None) == (
        "<image><unk></image><slice><unk></slice><slice><unk></slice>\n<slice><unk></slice><slice><unk></slice>")
    assert sliced_image_ids([None, [2, 1], None, [3, 3]]) == [None, 0, None, 1]
    text = expand_image_markers(f"a {IMAGE_MARKER} b {IMAGE_MARKER}", [None, [2, 1]], 1)
    assert text == ("a <image_id>0</image_id><image><unk></image> b "
                    "<image_id>1</image_id><image><unk></image><slice><unk></slice><slice><unk></slice>")
    assert expand_image_markers("<image>\nq", [None], 1, [None], marker="<image>") == "<image><unk></image>\nq"


@pytest.mark.parametrize("size, n_views", SIZES_AND_VIEWS)
def test_placeholder_count_equals_views_times_queries(processor, size, n_views):
    out = processor(f"{IMAGE_MARKER}\nWhat is this?", [Image.new("RGB", size, (90, 30, 200))])
    unk = processor.token_ids["unk"]
    ids = out["input_ids"][0]
    assert int((ids == unk).sum()) == n_views * Q
    assert len(out["pixel_values"][0]) == n_views and out["tgt_sizes"][0].shape == (n_views, 2)
    assert out["image_bound"][0].shape == (n_views, 2) and out["image_sizes"] == [[size]]
    _assert_bounds_on_unk_runs(ids, out["image_bound"][0], unk)


def test_exact_layout_of_1000x600(processor, tokenizer):
    out = processor(IMAGE_MARKER, [Image.new("RGB", (1000, 600))])
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())
    unks = ["<unk>"] * Q
    expected = (["<image_id>", "0", "</image_id>", "<image>"] + unks + ["</image>", "<slice>"] + unks
                + ["</slice>", "<slice>"] + unks + ["</slice>"])
    assert tokens == expected
    assert out["image_bound"][0].tolist() == [[4, 68], [70, 134], [136, 200]]
    assert out["tgt_sizes"][0].tolist() == [[25, 41], [35, 29], [35, 29]]


def test_two_images_in_one_prompt(processor):
    images = [Image.new("RGB", (640, 480)), Image.new("RGB", (300, 200))]
    out = processor(f"Compare {IMAGE_MARKER} with {IMAGE_MARKER} please.", images)
    ids = out["input_ids"][0]
    assert out["image_bound"][0].shape == (4, 2)  # 3 views + 1 view, in textual order
    _assert_bounds_on_unk_runs(ids, out["image_bound"][0], processor.token_ids["unk"])
    assert out["tgt_sizes"][0].tolist() == [[28, 37], [39, 26], [39, 26], [26, 39]]
    id_positions = (ids == processor.token_ids["im_id_start"]).nonzero().flatten()
    assert processor.tokenizer.decode(ids[id_positions[1] + 1]) == "1"  # second image is numbered 1


def test_batch_left_padding_shifts_bounds(processor):
    short, long_ = f"{IMAGE_MARKER}\nhi", f"{IMAGE_MARKER}\nWhat is in the image? Describe it."
    images = [Image.new("RGB", (448, 448))]
    batch = processor([short, long_], [images, images])
    single = [processor(t, images) for t in (short, long_)]
    lengths = [s["input_ids"].shape[1] for s in single]
    pad = lengths[1] - lengths[0]
    assert pad > 0 and batch["input_ids"].shape == (2, lengths[1])
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * lengths[0]
    assert batch["attention_mask"][1].all()
    assert (batch["input_ids"][0, :pad] == processor.pad_id).all()
    assert torch.equal(batch["input_ids"][0, pad:], single[0]["input_ids"][0])
    assert torch.equal(batch["image_bound"][0], single[0]["image_bound"][0] + pad)
    assert torch.equal(batch["image_bound"][1], single[1]["image_bound"][0])
    _assert_bounds_on_unk_runs(batch["input_ids"][0], batch["image_bound"][0], processor.token_ids["unk"])
    right = processor([short, long_], [images, images], padding_side="right")
    assert torch.equal(right["image_bound"][0], single[0]["image_bound"][0])
    assert right["attention_mask"][0].tolist() == [1] * lengths[0] + [0] * pad


def test_text_only_and_mask_does_not_rely_on_id_zero(processor):
    texts = ["<|endoftext|> hi", "hello there, a much longer prompt"]  # id 0 (the pad id) inside real text
    out = processor(texts)
    n0 = len(processor.tokenizer.encode(texts[0], add_special_tokens=False))
    pad = out["input_ids"].shape[1] - n0
    assert pad > 0 and out["input_ids"][0, pad] == 0 and out["attention_mask"][0, pad] == 1
    assert int(out["attention_mask"][0].sum()) == n0
    assert out["image_bound"][0].shape == (0, 2) and out["tgt_sizes"][0].shape == (0, 2)
    assert out["pixel_values"] == [[], []]


def test_marker_count_mismatch(processor):
    with pytest.raises(ValueError, match="1 image markers.*2 images"):
        processor(f"{IMAGE_MARKER} q", [Image.new("RGB", (64, 64))] * 2)
    with pytest.raises(ValueError, match="0 image markers"):
        processor("<image>./</image> without parentheses", [Image.new("RGB", (64, 64))])


def test_truncation_never_cuts_an_image(processor):
    images = [Image.new("RGB", (448, 448)), Image.new("RGB", (448, 448))]
    text = f"{IMAGE_MARKER} and {IMAGE_MARKER} tail text that can go"
    full = processor(text, images)["input_ids"].shape[1]
    end_of_second = int(processor(text, images)["image_bound"][0][1, 1])
    kept = processor(text, images, max_length=end_of_second + 1)  # keeps the final </image>
    assert kept["input_ids"].shape[1] == end_of_second + 1 < full
    with pytest.raises(ValueError, match=f"prompt of {full} tokens exceeds max_length {end_of_second} and "
                                         "truncation would cut image 1"):
        processor(text, images, max_length=end_of_second)
    with pytest.raises(ValueError, match="would cut image 0"):
        processor(text, images, max_length=10)


def test_find_image_bound_checks(tokenizer):
    ids = special_token_ids(tokenizer)
    seq = [ids["im_start"], ids["unk"], ids["unk"], ids["im_end"], ids["slice_start"], ids["unk"]]
    with pytest.raises(ValueError, match="unbalanced"):
        find_image_bound(seq, ids)
    with pytest.raises(ValueError, match="not all 3"):
        find_image_bound(seq[:4], ids, query_num=3)
    assert find_image_bound(seq[:4], ids, query_num=2).tolist() == [[1, 3]]
