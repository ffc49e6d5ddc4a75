"""Generation on the MLLM: batching, KV cache, beam search, streaming and chat, on a random tiny checkpoint."""

import pytest
import torch
from PIL import Image, ImageDraw

from mllm.model.generation import GenerationSettings, build_chat_prompt, generate, stream_generate
from mllm.model.loading import load_pretrained


def picture(w: int, h: int, colour: str) -> Image.Image:
    image = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(image).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=colour)
    return image


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_pretrained(tiny_checkpoint)


def prompts(tokenizer):
    questions = [([picture(100, 90, "red")], "What is this?"),
                 ([picture(300, 120, "blue")], "Describe the image in detail please, every object."),  # sliced
                 ([], "Is there a star?")]
    texts, images = [], []
    for imgs, question in questions:
        text, ordered = build_chat_prompt([{"role": "user", "content": imgs + [question]}], tokenizer)
        texts.append(text)
        images.append(ordered)
    return texts, images


FIXED_LENGTH = GenerationSettings("greedy", max_new_tokens=8, min_new_tokens=8)


def test_left_padded_batch_equals_each_prompt_alone(loaded):
    model, tokenizer, processor = loaded
    texts, images = prompts(tokenizer)
    batch = processor(texts, images)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    together = generate(model, batch, tokenizer, FIXED_LENGTH)
    alone = [generate(model, processor([t], [i]), tokenizer, FIXED_LENGTH)[0] for t, i in zip(texts, images)]
    assert together == alone


def test_kv_cache_and_beam_of_one_equal_greedy(loaded):
    model, tokenizer, processor = loaded
    texts, images = prompts(tokenizer)
    batch = processor(texts[:2], images[:2])
    greedy = generate(model, batch, tokenizer, FIXED_LENGTH)
    no_cache = generate(model, batch, tokenizer, GenerationSettings("greedy", 8, 8, {"use_cache": False}))
    one_beam = generate(model, batch, tokenizer, GenerationSettings("beam", 8, 8, {"num_beams": 1, "repetition_penalty": 1.0}))
    assert no_cache == greedy
    assert one_beam == greedy


def test_every_decoding_strategy_runs(loaded):
    model, tokenizer, processor = loaded
    texts, images = prompts(tokenizer)
    batch = processor(texts[:2], images[:2])
    torch.manual_seed(0)
    for decoding in ("sample", "beam"):
        answers = generate(model, batch, tokenizer, GenerationSettings(decoding, 6, 2))
        assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="unknown decoding"):
        generate(model, batch, tokenizer, GenerationSettings("nucleus", 4))


def test_streaming_yields_exactly_the_answer(loaded):
    model, tokenizer, processor = loaded
    texts, images = prompts(tokenizer)
    for text, imgs in zip(texts, images):
        inputs = processor([text], [imgs])
        settings = GenerationSettings("greedy", max_new_tokens=12, min_new_tokens=12)
        pieces = list(stream_generate(model, inputs, tokenizer, settings))
        assert "".join(pieces) == generate(model, inputs, tokenizer, settings)[0]


def test_chat_single_and_multiple_images(loaded):
    model, tokenizer, processor = loaded
    msgs = [{"role": "user", "content": "What colour is it?"}]
    answer = model.chat(picture(64, 64, "red"), msgs, tokenizer, max_new_tokens=5, min_new_tokens=5)
    streamed = "".join(model.chat(picture(64, 64, "red"), msgs, tokenizer, stream=True, max_new_tokens=5,
                                  min_new_tokens=5))
    assert answer == streamed
    two = [{"role": "user", "content": [picture(64, 64, "red"), picture(80, 40, "blue"), "Compare them."]}]
    assert isinstance(model.chat(None, two, tokenizer, max_new_tokens=4), str)


def test_chat_prompt_layout(loaded):
    _, tokenizer, _ = loaded
    image = picture(32, 32, "red")
    text, ordered = build_chat_prompt([{"role": "user", "content": "Hi"}], tokenizer, images=[image], system_prompt="")
    assert text == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n(<image>./</image>)\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert ordered == [image]
    with pytest.raises(ValueError, match="start with a user message"):
        build_chat_prompt([{"role": "assistant", "content": "x"}], tokenizer)


def test_question_first_puts_each_user_messages_images_after_its_text(loaded):
    _, tokenizer, _ = loaded
    red, blue = picture(32, 32, "red"), picture(32, 32, "blue")
    user = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"
    text, ordered = build_chat_prompt([{"role": "user", "content": "Hi"}], tokenizer, images=[red], system_prompt="",
                                      question_first=True)
    assert text == user + "Hi\n(<image>./</image>)<|im_end|>\n<|im_start|>assistant\n" and ordered == [red]
    msgs = [{"role": "user", "content": [red, "Which?", blue]}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "Sure?"}]
    text, ordered = build_chat_prompt(msgs, tokenizer, system_prompt="", question_first=True)
    assert text.startswith(user + "Which?\n(<image>./</image>)\n(<image>./</image>)<|im_end|>")
    assert ordered == [red, blue]
