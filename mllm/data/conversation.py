"""Conversation -> (input_ids, labels, image_bound) for supervised training (facts sheet §8.1).

Two pure steps, in the order data flows:

    place_images(conversation, grids, query_num)  image keys in the text -> placeholder text, keys in order
    conversation_to_ids(conversation, tokenizer)  ChatML text -> input_ids [L], labels [L], image_bound [V, 2]

Conventions (decided once; every trainer and loss in `mllm.train` relies on them):

- Rendering: `tokenizer.apply_chat_template(messages, tokenize=False)` (Qwen2 ChatML; the template inserts the
  default system prompt when the first message is not a system one), tokenized without extra special tokens;
  the final token, the "\\n" after the last `<|im_end|>`, is dropped (and checked to be "\\n").
- Response spans: for every `<|im_start|>` followed by the token(s) of "assistant", the positions from the
  token after "assistant" (the "\\n") through the next `<|im_end|>` inclusive are "response" (context 0);
  everything else (system, user, image placeholders, role headers) is context 1.
- Labels are PRE-SHIFTED: labels[t] is the target of logits[t]; losses never shift again.
      context[t] == 0                       -> labels[t-1] = input_ids[t]
      context[t] == 1 and context[t-1] == 0 -> labels[t-1] = eot (if the tokenizer has one) else eos
  So "assistant" predicts "\\n", each reply token predicts the next one, the last reply token predicts
  `<|im_end|>`, and the `<|im_end|>` of a non-final assistant turn predicts the tokenizer's eos. Our
  tokenizers' eos IS `<|im_end|>` (MiniCPM-V 2.6's too), so that position learns `<|im_end|>` again, exactly as
  the reference does; the final `<|im_end|>` has no next token and stays -100. Everything else is -100.
- Images: the exercise's `"image": "path"` uses the key `<image>`: replaced in place in the first user message,
  or, if absent there, placeholder + "\\n" + content (after the text instead, wherever the key was, for a model
  trained with the question first: `place_images(question_first=True)`). `"image": {"<image_00>": path, ...}`
  keys each appear once anywhere in the conversation and are replaced in place. Images are ordered by where their
  key appears, which is the order of their views in `pixel_values` and of their spans in `image_bound`.
  `<image_id>k</image_id>` is added only for sliced images, numbered among sliced images (the training quirk of
  §8.1.7).
- Truncation to `max_length` keeps every image whole: if the closing token of any view would be cut, the sample
  fails with `TruncationError` (it cannot be fixed by cutting text). A sample with no target token left
  raises `NoTargetError` ("No tokens available to compute loss", as the reference). Datasets count both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from mllm.model.processing import expand_image_markers, find_image_bound, sliced_image_ids
from mllm.model.tokenization import special_token_ids

IGNORE_INDEX = -100
SINGLE_IMAGE_KEY = "<image>"
MULTI_IMAGE_KEY = re.compile(r"<image_\d+>")
ROLES = ("system", "user", "assistant")


class NoTargetError(ValueError):
    """The sample has no position with a target token, so it cannot contribute to the loss."""


class TruncationError(ValueError):
    """Truncating the sample to max_length would cut through an image placeholder."""


# The exercise's roles, plus LLaVA / ShareGPT's ("from": "human" | "gpt", "value": text), read the same way.
ROLE_NAMES = {"user": "user", "assistant": "assistant", "system": "system", "human": "user", "gpt": "assistant"}


def normalize_conversation(conversation) -> list[dict]:
    """[{role, content}] from the exercise's messages or LLaVA's {from, value}; ValueError saying what is wrong."""
    if not isinstance(conversation, (list, tuple)):
        raise ValueError(f"'conversations' must be a list of messages ({{role, content}} or LLaVA's {{from, value}}), "
                         f"got a {type(conversation).__name__}")
    out = []
    for i, msg in enumerate(conversation):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} must be an object, got {type(msg).__name__}")
        role, content = msg.get("role", msg.get("from")), msg.get("content", msg.get("value"))
        if role not in ROLE_NAMES:
            raise ValueError(f"message {i}: role {role!r} is not one of user / assistant / system (or LLaVA's "
                             "human / gpt)")
        out.append({"role": ROLE_NAMES[role], "content": content})
    validate_conversation(out)
    return out


def validate_conversation(conversation: Sequence[dict]) -> None:
    """At least one user and one assistant message, the first non-system message from the user."""
    if not isinstance(conversation, (list, tuple)) or len(conversation) < 2:
        raise ValueError("a conversation needs at least 2 messages")
    for i, msg in enumerate(conversation):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} must be {{role: one of {ROLES}, content: str}}, got {msg!r:.200}")
        if msg["role"] == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
    first = conversation[1] if conversation[0]["role"] == "system" else conversation[0]
    if first["role"] != "user":
        raise ValueError("the first (non-system) message must come from the user")
    if not any(m["role"] == "assistant" for m in conversation):
        raise ValueError("the conversation has no assistant message to learn from")


def image_key_order(conversation: Sequence[dict], keys: Sequence[str]) -> list[str]:
    """The image keys in the order they appear in the text (single `<image>`: just that key).

    Multi-image keys (`<image_00>`...) must each appear exactly once; a missing, repeated or unknown key raises.
    """
    keys = list(keys)
    if keys == [SINGLE_IMAGE_KEY]:
        return keys
    if not all(MULTI_IMAGE_KEY.fullmatch(k) for k in keys):
        raise ValueError(f"image keys must be '<image>' alone or '<image_NN>' keys, got {keys}")
    text = "\n".join(m["content"] for m in conversation)
    found = MULTI_IMAGE_KEY.findall(text)
    unknown = sorted(set(found) - set(keys))
    missing = [k for k in keys if k not in found]
    repeated = sorted({k for k in found if found.count(k) > 1})
    if unknown or missing or repeated:
        raise ValueError(f"image keys in the text do not match the images: missing {missing}, "
                         f"unknown {unknown}, repeated {repeated}")
    return sorted(keys, key=text.index)


def _without_key(content: str, key: str) -> str:
    """`content` with its first `key` taken out: the text on either side joined by a newline where the key stood on
    a line of its own, by a space where it stood inside a line."""
    if key not in content:
        return content
    before, after = content.split(key, 1)
    joiner = "\n" if before.endswith("\n") or after.startswith("\n") else " "
    before, after = before.rstrip(" \n"), after.lstrip(" \n")
    return before + joiner + after if before and after else before or after


def place_images(conversation: Sequence[dict], grids: dict[str, Sequence[int] | None], query_num: int,
                 question_first: bool = False) -> tuple[list[dict], list[str]]:
    """Replace each image key by its placeholder; returns (new conversation, keys in textual order).

    grids: key -> slice grid [cols, rows] (None when the image is not sliced). `question_first` (a model trained so:
    its config's `question_first`): the single `<image>` goes after the first user message's text, wherever the
    data put it (the exercise's files write "<image>\n" + question), as `build_chat_prompt` places it at inference.
    Multi-image keys stay where the text puts them.
    """
    order = image_key_order(conversation, list(grids))
    ids = dict(zip(order, sliced_image_ids([grids[k] for k in order])))
    out = [dict(m) for m in conversation]
    if order == [SINGLE_IMAGE_KEY]:
        first = next(i for i, m in enumerate(out) if m["role"] == "user")
        content = out[first]["content"]
        if question_first:
            content = "\n".join(filter(None, (_without_key(content, SINGLE_IMAGE_KEY), SINGLE_IMAGE_KEY)))
        elif SINGLE_IMAGE_KEY not in content:
            content = SINGLE_IMAGE_KEY + "\n" + content
        out[first]["content"] = expand_image_markers(content, [grids[SINGLE_IMAGE_KEY]], query_num,
                                                     image_ids=[ids[SINGLE_IMAGE_KEY]], marker=SINGLE_IMAGE_KEY)
        return out, order
    for m in out:
        for key in order:
            if key in m["content"]:
                m["content"] = expand_image_markers(m["content"], [grids[key]], query_num, image_ids=[ids[key]],
                                                    marker=key)
    return out, order


def find_sequence(ids: list[int], pattern: list[int], start: int = 0) -> list[int]:
    """Every index i >= start with ids[i:i+len(pattern)] == pattern."""
    n = len(pattern)
    return [i for i in range(start, len(ids) - n + 1) if ids[i:i + n] == pattern]


def response_mask(input_ids: list[int], tokenizer, token_ids: dict) -> torch.Tensor:
    """context [L] (long): 0 on each assistant reply from the "\\n" after "assistant" through `<|im_end|>`."""
    role = tokenizer.encode("assistant", add_special_tokens=False)
    context = torch.ones(len(input_ids), dtype=torch.long)
    for start in find_sequence(input_ids, [token_ids["chat_start"]] + role):
        first = start + 1 + len(role)  # the "\n" after the role name
        ends = [i for i in range(first, len(input_ids)) if input_ids[i] == token_ids["chat_end"]]
        last = ends[0] if ends else len(input_ids) - 1
        context[first:last + 1] = 0
    return context


def preshifted_labels(input_ids: torch.Tensor, context: torch.Tensor, end_id: int) -> torch.Tensor:
    """labels [L] from ids [L] and context [L] by the two rules of the module docstring."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    target = context[1:] == 0  # (L-1,) position t+1 is a response token
    labels[:-1][target] = input_ids[1:][target]
    leaving = (context[1:] == 1) & (context[:-1] == 0)  # position t is the last of a response span
    labels[:-1][leaving] = end_id
    return labels


def conversation_to_ids(conversation: Sequence[dict], tokenizer, max_length: int | None = None,
                        query_num: int | None = None, token_ids: dict | None = None) -> dict:
    """input_ids long [L], labels long [L] (pre-shifted), image_bound long [V, 2] of a placeholder-expanded chat.

    Raises TruncationError if max_length would cut an image and NoTargetError if no target token remains.
    """
    validate_conversation(conversation)
    token_ids = token_ids or special_token_ids(tokenizer)
    text = tokenizer.apply_chat_template(list(conversation), tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids or tokenizer.decode(ids[-1:]) != "\n":
        raise ValueError("the chat template must end with '<|im_end|>\\n'; got a final token "
                         f"{tokenizer.decode(ids[-1:])!r} (template / tokenizer mismatch)")
    ids = ids[:-1]  # drop the trailing "\n" (§8.1 step 1)
    n_replies = sum(m["role"] == "assistant" for m in conversation)
    role = tokenizer.encode("assistant", add_special_tokens=False)
    if len(find_sequence(ids, [token_ids["chat_start"]] + role)) != n_replies:
        raise ValueError(f"found {len(find_sequence(ids, [token_ids['chat_start']] + role))} assistant headers for "
                         f"{n_replies} assistant messages (does a message contain '<|im_start|>assistant'?)")

    input_ids = torch.tensor(ids, dtype=torch.long)  # (L,)
    context = response_mask(ids, tokenizer, token_ids)
    end_id = getattr(tokenizer, "eot_id", None)  # the reference: eot_id if the tokenizer has one, else eos
    end_id = token_ids["eos"] if end_id is None else end_id
    labels = preshifted_labels(input_ids, context, end_id)
    bound = find_image_bound(input_ids, token_ids, query_num)  # (V, 2)

    if max_length is not None and len(input_ids) > max_length:
        if len(bound) and int(bound[:, 1].max()) >= max_length:  # a closing </image> or </slice> would be cut
            raise TruncationError(f"{len(input_ids)} tokens exceed max_length {max_length}, and the image "
                                  f"placeholders alone end at token {int(bound[:, 1].max()) + 1}")
        truncated_from = len(input_ids)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    else:
        truncated_from = None
    if not bool((labels != IGNORE_INDEX).any()):
        raise NoTargetError("No tokens available to compute loss" +
                            (f" after truncation to {max_length} tokens" if max_length is not None else ""))
    return {"input_ids": input_ids, "labels": labels, "image_bound": bound, "truncated_from": truncated_from}
