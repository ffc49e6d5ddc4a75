"""conversation -> input_ids / pre-shifted labels / image_bound, checked against hand-written token lists."""

import pytest
import torch

from mllm.data.conversation import (IGNORE_INDEX, NoTargetError, TruncationError, conversation_to_ids,
                                    image_key_order, place_images)
from mllm.model.tokenization import build_tokenizer

# Trained on exactly these words, so every word below is one token (checked in `test_tokens_are_whole_words`).
WORDS = ["system\nuser\nassistant\n", "You are a helpful assistant.", "Is there a cat?", "Yes",
         "What colour is it?", "Red", "<image_00> <image_01> and"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(WORDS * 50, vocab_size=400)


def ids(tok, tokens):
    out = tok.convert_tokens_to_ids(tokens)
    assert tok.unk_token_id not in out or "<unk>" in tokens
    return out


def test_tokens_are_whole_words(tok):
    enc = lambda s: tok.convert_ids_to_tokens(tok.encode(s, add_special_tokens=False))  # noqa: E731
    assert enc("assistant") == ["assistant"]
    assert enc("\nIs there a cat?") == ["Ċ", "Is", "Ġthere", "Ġa", "Ġcat", "?"]
    assert enc("What colour is it?") == ["What", "Ġcolour", "Ġis", "Ġit", "?"]


def test_two_turns_with_a_sliced_image_by_hand(tok):
    conv = [{"role": "user", "content": "<image>\nIs there a cat?"}, {"role": "assistant", "content": "Yes"},
            {"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "Red"}]
    placed, order = place_images(conv, {"<image>": [2, 1]}, query_num=2)  # sliced: 2 columns, 1 row
    assert order == ["<image>"]
    out = conversation_to_ids(placed, tok, query_num=2)

    U, NL = "<unk>", "Ċ"
    system = ["<|im_start|>", "system", NL, "You", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", ".", "<|im_end|>", NL]
    image = ["<image_id>", "0", "</image_id>", "<image>", U, U, "</image>", "<slice>", U, U, "</slice>",
             "<slice>", U, U, "</slice>"]
    user1 = ["<|im_start|>", "user", NL] + image + [NL, "Is", "Ġthere", "Ġa", "Ġcat", "?", "<|im_end|>", NL]
    reply1 = ["<|im_start|>", "assistant", NL, "Yes", "<|im_end|>", NL]
    user2 = ["<|im_start|>", "user", NL, "What", "Ġcolour", "Ġis", "Ġit", "?", "<|im_end|>", NL]
    reply2 = ["<|im_start|>", "assistant", NL, "Red", "<|im_end|>"]  # the final "\n" is dropped
    tokens = system + user1 + reply1 + user2 + reply2
    assert out["input_ids"].tolist() == ids(tok, tokens)

    # Pre-shifted targets, written position by position.
    expected = [IGNORE_INDEX] * len(tokens)
    a1 = len(system + user1) + 1  # index of the first "assistant"
    expected[a1] = "Ċ"  # "assistant" predicts the "\n" that opens the reply
    expected[a1 + 1] = "Yes"  # "\n" predicts the first reply token
    expected[a1 + 2] = "<|im_end|>"  # the last reply token predicts <|im_end|>
    expected[a1 + 3] = "<|im_end|>"  # a non-final <|im_end|> predicts eos, which is <|im_end|> here
    a2 = len(system + user1 + reply1 + user2) + 1
    expected[a2] = "Ċ"
    expected[a2 + 1] = "Red"
    expected[a2 + 2] = "<|im_end|>"  # the final <|im_end|> (a2 + 3) stays -100: nothing follows it
    expected = [e if e == IGNORE_INDEX else tok.convert_tokens_to_ids(e) for e in expected]
    assert out["labels"].tolist() == expected

    # <|im_start|> user \n <image_id> 0 </image_id> <image> | U U | </image> <slice> | U U | </slice> <slice> | U U
    start = len(system) + 7
    assert out["image_bound"].tolist() == [[start, start + 2], [start + 4, start + 6], [start + 8, start + 10]]


def test_unsliced_image_has_no_id_and_tag_is_prepended_when_absent(tok):
    conv = [{"role": "user", "content": "Is there a cat?"}, {"role": "assistant", "content": "Yes"}]
    placed, _ = place_images(conv, {"<image>": None}, query_num=2)
    assert placed[0]["content"] == "<image><unk><unk></image>\nIs there a cat?"
    assert conv[0]["content"] == "Is there a cat?"  # input untouched


@pytest.mark.parametrize("content", ["<image>\nIs there a cat?", "Is there a cat?", "Is there a cat?\n<image>",
                                     "Is there <image> a cat?"])
def test_question_first_puts_the_single_image_after_the_first_question(tok, content):
    conv = [{"role": "user", "content": content}, {"role": "assistant", "content": "Yes"},
            {"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "Red"}]
    placed, order = place_images(conv, {"<image>": [2, 1]}, query_num=1, question_first=True)
    assert order == ["<image>"]
    image = "<image_id>0</image_id><image><unk></image><slice><unk></slice><slice><unk></slice>"
    assert placed[0]["content"] == "Is there a cat?\n" + image
    assert [m["content"] for m in placed[1:]] == ["Yes", "What colour is it?", "Red"]
    assert conv[0]["content"] == content  # input untouched
    # the ids: the question's tokens, then the image span, then the end of the message
    out = conversation_to_ids(placed, tok, query_num=1)
    tokens = tok.convert_ids_to_tokens(out["input_ids"].tolist())
    user = tokens.index("user")
    assert tokens[user + 1:user + 8] == ["Ċ", "Is", "Ġthere", "Ġa", "Ġcat", "?", "Ċ"]
    assert tokens[user + 8:user + 11] == ["<image_id>", "0", "</image_id>"]
    assert out["image_bound"][0, 0] == user + 12  # after <image>


def test_multi_image_keys_in_textual_order(tok):
    conv = [{"role": "user", "content": "<image_01> and <image_00>"}, {"role": "assistant", "content": "Yes"}]
    assert image_key_order(conv, ["<image_00>", "<image_01>"]) == ["<image_01>", "<image_00>"]
    placed, order = place_images(conv, {"<image_00>": [2, 1], "<image_01>": None}, query_num=1)
    assert order == ["<image_01>", "<image_00>"]
    assert placed[0]["content"] == ("<image><unk></image> and <image_id>0</image_id><image><unk></image>"
                                    "<slice><unk></slice><slice><unk></slice>")
    with pytest.raises(ValueError, match="missing"):
        image_key_order(conv, ["<image_00>", "<image_01>", "<image_02>"])


def test_truncation_keeps_images_whole(tok):
    conv = [{"role": "user", "content": "<image>\nIs there a cat?"}, {"role": "assistant", "content": "Yes"}]
    placed, _ = place_images(conv, {"<image>": None}, query_num=4)
    full = conversation_to_ids(placed, tok, query_num=4)
    end = int(full["image_bound"][0, 1])  # index of </image>
    with pytest.raises(TruncationError):
        conversation_to_ids(placed, tok, max_length=end, query_num=4)  # would cut </image>
    with pytest.raises(NoTargetError):  # image fits but the reply does not
        conversation_to_ids(placed, tok, max_length=end + 3, query_num=4)
    cut = conversation_to_ids(placed, tok, max_length=len(full["input_ids"]) - 1, query_num=4)
    assert torch.equal(cut["labels"], full["labels"][:-1])


def test_rejects_bad_conversations(tok):
    with pytest.raises(ValueError, match="first"):
        conversation_to_ids([{"role": "assistant", "content": "Yes"}, {"role": "user", "content": "x"}], tok)
    with pytest.raises(ValueError, match="at least 2"):
        conversation_to_ids([{"role": "user", "content": "x"}], tok)
