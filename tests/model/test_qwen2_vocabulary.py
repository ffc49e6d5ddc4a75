"""The real Qwen2 vocabulary (the `qwen.tiktoken` ranks that the qwen-agent package ships) through our loader:
MiniCPM-V 2.6's special-token ids and a round trip of a few thousand strings against tiktoken itself."""

import importlib.util
import random
import unicodedata
from pathlib import Path

import pytest

from mllm.model.tokenization import (QWEN2_SPLIT_PATTERN, load_tokenizer, qwen2_tokenizer_from_tiktoken,
                                     special_token_ids)


@pytest.fixture(scope="module")
def ranks_file() -> Path:
    spec = importlib.util.find_spec("qwen_agent")  # found without importing it (its __init__ needs openai)
    assert spec is not None, "qwen-agent is a test dependency: `make test` installs it (--no-deps)"
    return Path(spec.submodule_search_locations[0]) / "utils" / "qwen.tiktoken"


@pytest.fixture(scope="module")
def tokenizer(ranks_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_tokenizer")
    qwen2_tokenizer_from_tiktoken(ranks_file).save_pretrained(folder)  # a checkpoint folder's tokenizer files
    return load_tokenizer(folder)


def test_minicpmv_special_token_ids(tokenizer):
    # facts sheet §5.1 (ids read from the real checkpoint's tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>",
                                                          "</image>", "<unk>")}
    assert ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<image>": 151646,
                   "</image>": 151647, "<unk>": 128244}
    assert [tokenizer.encode(w, add_special_tokens=False) for w in ("\n", "system", "user", "assistant")] == \
        [[198], [8948], [872], [77091]]
    named = special_token_ids(tokenizer)
    assert named["eos"] == named["chat_end"] == 151645 and named["pad"] == 151643
    placeholder = "<image>" + "<unk>" * 4 + "</image>"
    assert tokenizer.encode(placeholder, add_special_tokens=False) == [151646] + [128244] * 4 + [151647]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabets = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n\n  ", ".,;:!?'\"()[]{}<>-_/\\@#$%^&*+=~`|",
                 "的一是不了人我在有他这为之大来以个中上们", "àéîõüçñßøåÆŒ", "😀🚀🌍✨", "абвгдежзийклмнопрстуфхцчшщ", "αβγδεζηθ"]
    texts = []
    for _ in range(n):
        pieces = [rng.choice(rng.choice(alphabets)) for _ in range(rng.randint(1, 60))]
        texts.append(unicodedata.normalize("NFC", "".join(pieces)))
    texts += ["Is there a red circle in the image? Please answer yes or no.", "[120,340,560,780]",
              "def f(x):\n    return x ** 2  # don't", "  leading and trailing spaces  ", "1234567890 12 345"]
    return texts


def test_round_trip_matches_tiktoken(tokenizer, ranks_file):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    reference = tiktoken.Encoding(name="qwen2", pat_str=QWEN2_SPLIT_PATTERN,
                                  mergeable_ranks=load_tiktoken_bpe(str(ranks_file)), special_tokens={})
    texts = random_texts(3000)
    ours = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatched = [t for t, ids in zip(texts, ours) if ids != reference.encode_ordinary(t)]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} strings tokenize differently, e.g. {mismatched[:3]!r}"
    assert all(tokenizer.decode(ids) == t for t, ids in zip(texts, ours))
