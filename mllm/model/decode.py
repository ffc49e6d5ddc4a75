"""Our own decode loop for greedy and sampled generation, on a static preallocated KV cache.

transformers' `generate` is general: it rebuilds its inputs, output objects and logits processors at every step and
its `DynamicCache` concatenates (copies) the whole cache for every new token. For one model whose forward we own,
a loop of a few lines does the same work: one prefill, then one token per step written into a cache allocated once
for `prompt + max_new_tokens` positions.

- Same tokens as transformers for greedy decoding, and the same draws for sampling with the same seed: the logits
  processors are transformers' own classes, built in the order `generate` builds them (repetition penalty,
  min-new-tokens, then temperature, top-k, top-p), and the token is drawn with the same `torch.multinomial` call.
- Left padding: positions count real tokens only (`cumsum(mask) - 1`, as transformers does), so a padded prompt
  decodes as it would alone.
- Beam search is not here: `mllm.model.generation` hands it to transformers' loop.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class StaticCache:
    """Keys and values of every layer in buffers of (B, kv heads, max_len, head_dim), filled left to right.

    `update` writes the new positions in place and returns views of the filled part: nothing is copied as the
    cache grows (a `DynamicCache` concatenates the whole cache at every step). Buffers are allocated on the first
    update of each layer, in the dtype and on the device of the keys the layer produces.
    """

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, nkv, T, hd) -> all keys and values so far, (B, nkv, past + T, hd) views."""
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"static cache holds {self.max_len} positions; layer {layer_idx} needs {end}")
        if self.keys[layer_idx] is None:
            B, nkv, _, hd = k.shape
            self.keys[layer_idx] = k.new_empty(B, nkv, self.max_len, hd)
            self.values[layer_idx] = v.new_empty(B, nkv, self.max_len, v.shape[-1])
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


def logits_processors(config: GenerationConfig) -> LogitsProcessorList:
    """transformers' processors for the settings this loop supports, in the order `generate` applies them."""
    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
    if config.min_new_tokens:
        # the prompt goes in as embeddings: the ids the processors see are the new tokens only
        processors.append(MinNewTokensLengthLogitsProcessor(0, config.min_new_tokens, config.eos_token_id))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return processors


UNSET_DEFAULTS = {"do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                  "repetition_penalty": 1.0, "min_new_tokens": 0, "max_new_tokens": 20}
SUPPORTED = {"do_sample", "num_beams", "max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p",
             "repetition_penalty", "eos_token_id", "pad_token_id"}


def settings_of(llm, **kwargs) -> GenerationConfig:
    """The model's generation defaults updated with `kwargs`; a setting this loop does not implement is refused."""
    unknown = sorted(set(kwargs) - SUPPORTED)
    if unknown:
        raise ValueError(f"the decode loop does not implement {unknown}; supported: {sorted(SUPPORTED)}")
    config = GenerationConfig.from_dict({**llm.generation_config.to_dict(), **kwargs})
    for name, value in UNSET_DEFAULTS.items():  # what transformers' generate assumes for a field nobody set
        if getattr(config, name, None) is None:
            setattr(config, name, value)
    if (config.num_beams or 1) > 1:
        raise ValueError("beam search is transformers' loop (mllm.model.generation hands it over)")
    if config.eos_token_id is None:
        raise ValueError("eos_token_id (one id or a list) is required")
    return config


@torch.inference_mode()
def decode(llm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, streamer=None,
           **settings) -> torch.Tensor:
    """New token ids (B, N <= max_new_tokens) after a prompt given as embeddings (B, T, C), left-padded.

    Rows that stopped early are filled with `pad_token_id` up to the longest row, as transformers does.
    `settings`: do_sample, max_new_tokens, min_new_tokens, temperature, top_k, top_p, repetition_penalty,
    eos_token_id (one id or a list), pad_token_id.
    """
    config = settings_of(llm, **settings)
    processors = logits_processors(config)
    B, T, _ = inputs_embeds.shape
    device = inputs_embeds.device
    stops = torch.tensor(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id],
                         device=device)
    pad_id = config.pad_token_id if config.pad_token_id is not None else int(stops[0])
    max_new = int(config.max_new_tokens)
    cache = StaticCache(llm.config.num_hidden_layers, T + max_new)

    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: the fast unmasked attention paths
    if attention_mask is None:
        positions = torch.arange(T, device=device)[None].expand(B, T)  # (B, T)
        full_mask = None
    else:
        attention_mask = attention_mask.long()
        positions = (attention_mask.cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)  # (B, T)
        full_mask = torch.ones(B, T + max_new, dtype=torch.long, device=device)  # new tokens are always real
        full_mask[:, :T] = attention_mask
    next_position = positions[:, -1:] + 1  # (B, 1)

    generated = torch.empty(B, 0, dtype=torch.long, device=device)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    logits = llm(inputs_embeds=inputs_embeds, attention_mask=full_mask[:, :T] if full_mask is not None else None,
                 position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)
    for step in range(max_new):
        scores = processors(generated, logits)  # (B, V) fp32
        if config.do_sample:
            token = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)  # (B,)
        else:
            token = scores.argmax(dim=-1)  # (B,)
        token = torch.where(unfinished, token, pad_id)
        generated = torch.cat([generated, token[:, None]], dim=1)  # (B, step + 1); tiny next to the cache
        if streamer is not None:
            streamer.put(token.cpu())
        unfinished &= ~torch.isin(token, stops)
        if step == max_new - 1 or not bool(unfinished.any()):
            break
        S = T + step + 1
        logits = llm(input_ids=token[:, None], attention_mask=full_mask[:, :S] if full_mask is not None else None,
                     position_ids=next_position, cache=cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    if streamer is not None:
        streamer.end()
    return generated
