"""The built tokenizer (ids, digits, ChatML template) and loading a MiniCPM-V-style folder without remote code."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mllm.model.tokenization import SPECIAL_TOKENS, build_tokenizer, load_tokenizer, special_token_ids

TEXTS = [
    "You are a helpful assistant.",
    "What is in the image? A cat sits on a red box at [120,340,560,780].",
    "Please answer yes or no. Yes. No.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=400)


def test_special_tokens_have_fixed_low_ids(tokenizer):
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == expected_id
        assert tokenizer.encode(token, add_special_tokens=False) == [expected_id]  # matched whole
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.unk_token == "<unk>"
    assert tokenizer.bos_token_id is None  # Qwen2 style: no BOS


def test_digits_are_single_tokens(tokenizer):
    tokens = tokenizer.tokenize("[120,340]")
    assert tokens == ["[", "1", "2", "0", ",", "3", "4", "0", "]"]
    assert tokenizer.decode(tokenizer.encode("box 2024\nok", add_special_tokens=False)) == "box 2024\nok"


def test_chat_template_matches_qwen2_chatml(tokenizer):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "What is 12+3?"}]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nHi there<|im_end|>\n"
                "<|im_start|>assistant\nHello<|im_end|>\n"
                "<|im_start|>user\nWhat is 12+3?<|im_end|>\n"
                "<|im_start|>assistant\n")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == expected
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer.encode(expected, add_special_tokens=False)
    assert tokenizer.decode(ids) == expected
    # an explicit (empty) system message replaces the default one
    with_system = [{"role": "system", "content": ""}, {"role": "user", "content": "x"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nx<|im_end|>\n")


def test_special_token_ids(tokenizer):
    ids = special_token_ids(tokenizer)
    assert ids["im_start"] == tokenizer.convert_tokens_to_ids("<image>")
    assert ids["slice_end"] == tokenizer.convert_tokens_to_ids("</slice>")
    assert ids["unk"] == 3 and ids["chat_end"] == ids["eos"] == 2 and ids["pad"] == 0 and ids["bos"] is None


def test_special_token_ids_names_missing_tokens():
    bare = Tokenizer(models.BPE(vocab={"a": 0, "<|im_end|>": 1}, merges=[]))
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    lacking = PreTrainedTokenizerFast(tokenizer_object=bare, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match=r"<image>.*<slice>"):
        special_token_ids(lacking)


def _make_remote_folder(tokenizer, folder):
    """Save `tokenizer` and rewrite its config the way a MiniCPM-V 2.6 checkpoint names its remote class."""
    tokenizer.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "MiniCPMVTokenizerFast"
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_minicpmv_fast.MiniCPMVTokenizerFast"]}
    config_file.write_text(json.dumps(config))


def test_load_plain_folder_round_trips(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = "<|im_start|>user\n<image><unk><unk></image>cat 42<|im_end|>\n"
    assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert loaded.chat_template == tokenizer.chat_template


def test_load_remote_class_folder_without_remote_code(tokenizer, tmp_path):
    _make_remote_folder(tokenizer, tmp_path)
    loaded = load_tokenizer(tmp_path)  # would need trust_remote_code through AutoTokenizer
    assert special_token_ids(loaded) == special_token_ids(tokenizer)
    text = "<image_id>0</image_id><image><unk></image><slice><unk></slice>\nhi 123"
    assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert loaded.apply_chat_template(messages, tokenize=False) == rendered


def test_load_makes_vocab_special_tokens_atomic(tokenizer, tmp_path):
    """As in a real checkpoint, `<unk>` may be a plain BPE entry rather than an added token; it must still
    encode as one token with its vocabulary id."""
    _make_remote_folder(tokenizer, tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<unk>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("unk_token", None)
    config.get("added_tokens_decoder", {}).pop("3", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("a<unk><unk>b", add_special_tokens=False)[1:3] == [3, 3]
