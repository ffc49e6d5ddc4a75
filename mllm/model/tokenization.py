"""Tokenizers for the MLLM: build a tiny Qwen2-style one for tests and toy models, or load a checkpoint's.

- `build_tokenizer` trains a byte-level BPE with the Qwen2 pipeline (NFC, Qwen2 split regex, byte-level) on
  the given texts. The Qwen2 regex matches `\\p{N}` one character at a time, so numbers tokenize one digit per
  token, as in MiniCPM-V; `whole_numbers` makes 0-999 one token each (the tiny course model's boxes). ChatML
  and MiniCPM-V special tokens get fixed low ids; `<|endoftext|>` is id 0 and the pad token, because the
  reference pads with 0 (facts sheet §6.6, §7.2).
- `load_tokenizer` never executes remote code: a MiniCPM-V 2.6 folder names `MiniCPMVTokenizerFast` through
  `auto_map`, a thin subclass of Qwen2's fast tokenizer, so the same files load as `Qwen2TokenizerFast`.
- `special_token_ids` resolves the ids the processor and the model need, failing loudly on a missing token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2TokenizerFast

# Qwen2's pre-tokenizer pattern (transformers' tokenization_qwen2.py); note the single-character `\p{N}`.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# MiniCPM-V's tokens: <unk> fills the 64 query slots of each view; the rest delimit images, slices, ids and
# the grounding markup.
MINICPMV_TOKENS = ["<unk>", "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>",
                   "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>"]
SPECIAL_TOKENS = CHATML_TOKENS + MINICPMV_TOKENS  # ids 0..17 in a built tokenizer, in this order

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Qwen2's ChatML template (§7.1): a default system turn when the conversation does not start with one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# name -> token, in the reference's vocabulary: "im_*" are the *image* delimiters (MiniCPMVTokenizerFast's
# im_start/im_end), "chat_*" the ChatML turn delimiters.
_REQUIRED_TOKENS = {
    "im_start": "<image>", "im_end": "</image>",
    "slice_start": "<slice>", "slice_end": "</slice>",
    "im_id_start": "<image_id>", "im_id_end": "</image_id>",
    "unk": "<unk>",
    "ref_start": "<ref>", "ref_end": "</ref>", "box_start": "<box>", "box_end": "</box>",
    "chat_start": "<|im_start|>", "chat_end": "<|im_end|>", "endoftext": "<|endoftext|>",
}


WHOLE_NUMBERS = [str(n) for n in range(1000)]  # every coordinate of a box on the 0-1000 grid but 1000 itself


def split_numbers(tokenizer) -> list[str]:
    """Those of "0" .. "999" the tokenizer does not hold as one token (all but the ten digits, unless built with
    `whole_numbers`)."""
    return [n for n in WHOLE_NUMBERS if len(tokenizer.encode(n, add_special_tokens=False)) != 1]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024,
                    whole_numbers: bool = False) -> PreTrainedTokenizerFast:
    """Train a small Qwen2-style byte-level BPE on `texts`, with ChatML and MiniCPM-V special tokens.

    `whole_numbers`: "0" .. "999" become tokens of their own (added tokens, matched longest first before the split,
    so "[87,123" is "[", "87", ",", "123"), one per box coordinate. With digits, the four coordinates x three places
    of a box share ten tokens, and what the LLM reads from the image must be picked by role as well as by object;
    measured, the tiny LLM then writes the first corner at its prior (docs/probes/README.md, stops 38-39)."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)  # special tokens take ids 0..17 in SPECIAL_TOKENS order
    if whole_numbers:  # single digits keep their BPE ids; the others follow the vocabulary
        backend.add_tokens([AddedToken(number, normalized=False) for number in WHOLE_NUMBERS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
        model_max_length=32768, padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _make_atomic(tokenizer: PreTrainedTokenizerBase) -> None:
    """Ensure every special token in the vocabulary is matched whole (as an added token), keeping its id.

    In a MiniCPM-V checkpoint `<unk>` is an ordinary BPE entry (id 128244); unless it is registered as an
    added token, the text `<unk>` would split into `<`, `unk`, `>` and the image spans would be wrong.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t in vocab and tokenizer.encode(t, add_special_tokens=False) != [vocab[t]]]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)


# MiniCPM-V 2.6's added tokens, in id order from 151643 (right after Qwen2's 151,643 byte-level BPE ranks;
# facts sheet §5.1: <|im_start|> 151644, <|im_end|> 151645, <image> 151646, </image> 151647). Its `<unk>` is
# no added token: it is the BPE rank 128244, marked special so that it is never split.
MINICPMV26_ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<ref>", "</ref>",
                           "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>", "<slice>", "</slice>",
                           "<image_id>", "</image_id>"]


def qwen2_tokenizer_from_tiktoken(ranks_file: str | Path,
                                  added_tokens: Iterable[str] = MINICPMV26_ADDED_TOKENS) -> PreTrainedTokenizerFast:
    """The real Qwen2 vocabulary from its tiktoken ranks file (`qwen.tiktoken`), as a fast tokenizer with
    Qwen2's pipeline (NFC, Qwen2 split regex, byte-level BPE), the given added tokens after the ranks, MiniCPM-V's
    `<unk>` and the ChatML template. Needs the `tiktoken` package (its ranks reader)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    added = list(added_tokens)
    backend = TikTokenConverter(vocab_file=str(ranks_file), pattern=QWEN2_SPLIT_PATTERN,
                                extra_special_tokens=added).converted()
    backend.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in MINICPMV_TOKENS if t not in added]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(folder: str | Path, check: bool = True) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored in `folder` without running remote code.

    A folder whose tokenizer_config.json declares a remote class (`auto_map`, e.g. MiniCPM-V 2.6's
    `MiniCPMVTokenizerFast`) or a class transformers does not know is loaded as `Qwen2TokenizerFast` from the
    same files. With `check`, the MiniCPM-V special tokens must resolve (see `special_token_ids`).
    """
    folder = Path(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    remote = "AutoTokenizer" in (config.get("auto_map") or {})
    tokenizer = None
    if config.get("tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        # Our own tokenizer: load it directly (AutoTokenizer would also parse the model's config.json).
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    elif not remote:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except ValueError:  # e.g. "Tokenizer class X does not exist or is not currently imported"
            tokenizer = None
    if tokenizer is None:  # MiniCPMVTokenizerFast only adds properties to Qwen2TokenizerFast
        tokenizer = Qwen2TokenizerFast.from_pretrained(folder)
    _make_atomic(tokenizer)
    if check:
        special_token_ids(tokenizer)
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """Ids of the tokens the processor and model rely on; ValueError naming every token that is missing.

    Keys: im_start/im_end (`<image>`/`</image>`), slice_start/slice_end, im_id_start/im_id_end, unk,
    ref/box start/end, chat_start/chat_end (`<|im_start|>`/`<|im_end|>`), endoftext, and from the tokenizer's
    own settings eos (must exist), pad (None if unset) and bos (None for Qwen2, which has no BOS).
    """
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in _REQUIRED_TOKENS.values() if tok not in vocab]
    if missing:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} lacks the special tokens "
                         f"{missing}; MiniCPM-V prompts need all of {list(_REQUIRED_TOKENS.values())}")
    ids: dict[str, int | None] = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in _REQUIRED_TOKENS.items()}
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token")
    ids["eos"] = tokenizer.eos_token_id
    ids["pad"] = tokenizer.pad_token_id
    ids["bos"] = tokenizer.bos_token_id
    return ids
