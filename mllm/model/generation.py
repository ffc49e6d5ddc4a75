"""Text generation for the MLLM: chat prompts -> processor tensors -> fused embeddings -> a decode loop.

The MLLM builds the fused `inputs_embeds` (the exercise's `generate`), a decode loop produces the new tokens, and
they are decoded to text. Greedy and sampled decoding (temperature / top-p / top-k / repetition penalty, min/max
new tokens, several stop tokens, streaming) run our own loop on a static KV cache (`mllm.model.decode`, same
tokens as transformers' loop); beam search, and an LLM that is not ours (e.g. transformers' Qwen2 swapped in),
or a setting the loop does not implement (`decode.SUPPORTED`; e.g. `use_cache=False`) run transformers'
`GenerationMixin`. Prompts in a batch are left-padded, so each decodes as it would alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from threading import Thread
from typing import Iterator

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from mllm.model.decode import SUPPORTED, decode
from mllm.model.llm import LLMForCausalLM

IMAGE_MARKER = "(<image>./</image>)"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

# The reference's settings (facts §7.4): chat sampling, greedy, and the official non-sampling beam search.
DECODING = {
    "greedy": dict(do_sample=False, num_beams=1),
    "sample": dict(do_sample=True, top_p=0.8, top_k=100, temperature=0.7, repetition_penalty=1.05),
    "beam": dict(do_sample=False, num_beams=3, repetition_penalty=1.2),
}


@dataclass
class GenerationSettings:
    decoding: str = "greedy"
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    overrides: dict = field(default_factory=dict)  # e.g. {"temperature": 0.2, "num_beams": 5}

    def kwargs(self) -> dict:
        if self.decoding not in DECODING:
            raise ValueError(f"unknown decoding {self.decoding!r}; choose one of {sorted(DECODING)}")
        return {**DECODING[self.decoding], "max_new_tokens": self.max_new_tokens,
                "min_new_tokens": self.min_new_tokens, **self.overrides}


def stop_token_ids(tokenizer) -> list[int]:
    ids = []
    for token in STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.append(int(token_id))
    if not ids:
        raise ValueError(f"tokenizer has none of the stop tokens {STOP_TOKENS}")
    return ids


def build_chat_prompt(msgs: list[dict], tokenizer, images: list[Image.Image] | None = None,
                      system_prompt: str | None = None, question_first: bool = False) -> tuple[str, list[Image.Image]]:
    """ChatML text with one `(<image>./</image>)` marker per image, and the images in marker order.

    `msgs` are {role, content} dicts whose content is a string or a list mixing strings and PIL images (the
    official convention: images become markers, pieces are joined with "\\n"). `images` given separately are
    placed before the first user message's text when that message carries no image of its own. With
    `question_first` (a model trained so: its config's `question_first`) each user message's images go after
    its text instead, in their order.
    """
    if not msgs or msgs[0].get("role") != "user":
        raise ValueError("msgs must start with a user message")
    rendered, ordered = [], []
    pending = list(images or [])
    for i, msg in enumerate(msgs):
        role, content = msg.get("role"), msg.get("content")
        if role not in ("user", "assistant"):
            raise ValueError(f"msgs[{i}]: role must be 'user' or 'assistant', not {role!r}")
        parts = content if isinstance(content, list) else [content]
        if i == 0 and pending and not any(isinstance(p, Image.Image) for p in parts):
            parts = pending + parts
            pending = []
        if question_first and role == "user":
            shown = [p for p in parts if isinstance(p, Image.Image)]
            parts = [p for p in parts if not isinstance(p, Image.Image)] + shown
        texts = []
        for part in parts:
            if isinstance(part, Image.Image):
                ordered.append(part)
                texts.append(IMAGE_MARKER)
            elif isinstance(part, str):
                texts.append(part)
            else:
                raise ValueError(f"msgs[{i}]: content items must be strings or PIL images, got {type(part).__name__}")
        rendered.append({"role": role, "content": "\n".join(texts)})
    if system_prompt is not None:
        rendered = [{"role": "system", "content": system_prompt}] + rendered
    text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    return text, ordered


def decode_new_tokens(tokenizer, ids: torch.Tensor, stop_ids: list[int]) -> str:
    """Text of generated ids: cut at the first stop token, drop padding and special tokens, strip."""
    tokens = ids.tolist()
    for i, token in enumerate(tokens):
        if token in stop_ids:
            tokens = tokens[:i]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@torch.inference_mode()
def generate(model, inputs: dict, tokenizer, settings: GenerationSettings | None = None,
             streamer: BaseStreamer | None = None) -> list[str]:
    """Answers for a processor batch (left-padded `input_ids`, `attention_mask`, vision inputs)."""
    settings = settings or GenerationSettings()
    stops = stop_token_ids(tokenizer)
    device = model.device
    input_ids = inputs["input_ids"].to(device)
    attention_mask = inputs["attention_mask"].to(device).long()
    embeds = model.get_vllm_embedding(input_ids, inputs.get("pixel_values"), inputs.get("tgt_sizes"),
                                      inputs.get("image_bound"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kwargs = settings.kwargs()
    if kwargs.get("num_beams", 1) == 1 and set(kwargs) <= SUPPORTED and isinstance(model.llm, LLMForCausalLM):
        output = decode(model.llm, embeds, attention_mask, streamer=streamer, eos_token_id=stops, pad_token_id=pad_id,
                        **kwargs)
        return [decode_new_tokens(tokenizer, row, stops) for row in output]
    with warnings.catch_warnings():
        # The prompt goes in as embeddings (image features have no ids), as in the reference model, so a
        # repetition penalty covers the answer's tokens only; transformers says so once per batch.
        warnings.filterwarnings("ignore", message="Passing `repetition_penalty` with `inputs_embeds`")
        output = model.llm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, eos_token_id=stops, pad_token_id=pad_id,
            streamer=streamer, **kwargs,
        )
    return [decode_new_tokens(tokenizer, row, stops) for row in output]


class TextDeltaStreamer(BaseStreamer):
    """Yields the answer text piece by piece; the pieces join to exactly the non-streamed answer.

    Text is re-decoded from all new tokens at every step (answers are short) and only the part that can no
    longer change is released: nothing after an incomplete UTF-8 sequence, no trailing whitespace (the final
    answer is stripped), nothing after a stop token.
    """

    def __init__(self, tokenizer, stop_ids: list[int]):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False
        self.queue: list[str] = []
        self._done = False
        import queue

        self._queue: "queue.Queue[str | None]" = queue.Queue()

    def put(self, value: torch.Tensor) -> None:
        if self.stopped:
            return
        for token in value.reshape(-1).tolist():
            if token in self.stop_ids:
                self.stopped = True
                break
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):
            return
        self._release(text.rstrip())

    def end(self) -> None:
        self._release(self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip())
        self._queue.put(None)

    def _release(self, text: str) -> None:
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            self._queue.put(text[len(self.emitted):])
            self.emitted = text

    def __iter__(self) -> Iterator[str]:
        while (piece := self._queue.get()) is not None:
            yield piece


def stream_generate(model, inputs: dict, tokenizer, settings: GenerationSettings | None = None) -> Iterator[str]:
    """Generate one answer in a background thread, yielding its text as it grows."""
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("streaming takes one prompt at a time")
    settings = settings or GenerationSettings()
    if settings.kwargs().get("num_beams", 1) > 1:
        raise ValueError("beam search cannot stream: its best sequence is only known at the end")
    streamer = TextDeltaStreamer(tokenizer, stop_token_ids(tokenizer))
    errors: list[BaseException] = []

    def run():
        try:
            generate(model, inputs, tokenizer, settings, streamer=streamer)
        except BaseException as err:  # surfaced in the caller's thread below
            errors.append(err)
            streamer._queue.put(None)

    thread = Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
