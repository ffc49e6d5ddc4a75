"""Our decode loop (static KV cache) against transformers' `generate` on the same weights."""

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mllm.model.configuration import LLMConfig
from mllm.model.cpu_linear import cpu_matmul_layout, pack_linears, packing_available
from mllm.model.decode import StaticCache, decode
from mllm.model.llm import LLMForCausalLM

STOP, PAD = 3, 0


@pytest.fixture(scope="module")
def pair():
    """Our LLM and transformers' Qwen2 holding the same random weights (GQA, biases on q/k/v)."""
    config = LLMConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    ours = LLMForCausalLM(config).eval()
    for p in ours.parameters():  # larger weights than the init: peaked, varied next-token distributions
        p.data.normal_(0, 0.3)
    qcfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})
    qcfg._attn_implementation = "sdpa"
    theirs = Qwen2ForCausalLM(qcfg).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def prompts(batch: int, padded: bool):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(4, 97, (batch, 12), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for i in range(batch):
            mask[i, : i % 5] = 0  # left padding of 0..4 tokens
            ids[i, : i % 5] = PAD
    return ids, mask


def theirs_generate(model, embeds, mask, **kw):
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, eos_token_id=[STOP], pad_token_id=PAD, **kw)
    return out


@pytest.mark.parametrize("batch,padded", [(1, False), (8, False), (8, True)])
def test_greedy_tokens_equal_transformers(pair, batch, padded):
    ours, theirs = pair
    ids, mask = prompts(batch, padded)
    with torch.inference_mode():
        embeds = ours.get_input_embeddings()(ids)
        mine = decode(ours, embeds, mask, max_new_tokens=24, eos_token_id=[STOP], pad_token_id=PAD)
        ref = theirs_generate(theirs, embeds, mask, max_new_tokens=24, do_sample=False)
    assert mine.shape[1] > 1
    assert torch.equal(mine, ref)
    # and the same as transformers' loop running on our own LLM (the path beam search keeps)
    with torch.inference_mode():
        ref_ours = theirs_generate(ours, embeds, mask, max_new_tokens=24, do_sample=False)
    assert torch.equal(mine, ref_ours)


@pytest.mark.parametrize("batch,padded", [(1, False), (8, True)])
def test_greedy_tokens_equal_transformers_on_the_cpu_inference_layout(pair, batch, padded):
    """As `load_pretrained` leaves an LLM on the CPU: weights transposed in memory, products of several rows through
    oneDNN on packed weights (summed in another order than transformers' MKL products)."""
    ours, theirs = pair
    fast = copy.deepcopy(ours)
    cpu_matmul_layout(fast)
    assert pack_linears(fast) == (0 if not packing_available() else 2 * 7 + 1)  # 7 linears a layer, lm_head
    ids, mask = prompts(batch, padded)
    with torch.inference_mode():
        embeds = ours.get_input_embeddings()(ids)
        mine = decode(fast, embeds, mask, max_new_tokens=24, eos_token_id=[STOP], pad_token_id=PAD)
        ref = theirs_generate(theirs, embeds, mask, max_new_tokens=24, do_sample=False)
    assert mine.shape[1] > 1 and torch.equal(mine, ref)


@pytest.mark.parametrize("padded", [False, True])
def test_sampling_draws_equal_transformers_with_a_seed(pair, padded):
    ours, theirs = pair
    ids, mask = prompts(8, padded)
    # With left padding and a prompt given as embeddings, transformers' repetition penalty skips as many *new*
    # tokens of a row as the row has padding (its prompt_ignore_length counts prompt positions that are not in
    # its input_ids); ours penalises every new token (see the next test), so the padded comparison leaves it out.
    settings = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.0 if padded else 1.1,
                    min_new_tokens=3, max_new_tokens=16)
    with torch.inference_mode():
        embeds = ours.get_input_embeddings()(ids)
        torch.manual_seed(123)
        mine = decode(ours, embeds, mask, eos_token_id=[STOP], pad_token_id=PAD, **settings)
        torch.manual_seed(123)
        ref = theirs_generate(theirs, embeds, mask, **settings)
        torch.manual_seed(124)
        other = decode(ours, embeds, mask, eos_token_id=[STOP], pad_token_id=PAD, **settings)
    assert torch.equal(mine, ref)
    assert not torch.equal(mine, other)  # the seed matters: these really are draws
    assert not (mine[:, :3] == STOP).any()  # min_new_tokens held


def test_padded_rows_decode_as_alone_with_a_repetition_penalty(pair):
    ours, _ = pair
    ids, mask = prompts(8, True)
    settings = dict(repetition_penalty=1.3, max_new_tokens=16, eos_token_id=[STOP], pad_token_id=PAD)
    with torch.inference_mode():
        embeds = ours.get_input_embeddings()(ids)
        batched = decode(ours, embeds, mask, **settings)
        for i in range(8):
            real = mask[i].bool()
            alone = decode(ours, embeds[i:i + 1, real], **settings)[0]
            assert torch.equal(batched[i, : len(alone)], alone), i


def test_stops_and_pads_like_transformers(pair):
    """Rows that hit a stop token are padded; the loop ends when every row has stopped."""
    ours, _ = pair
    ids, mask = prompts(8, True)
    with torch.inference_mode():
        embeds = ours.get_input_embeddings()(ids)
        free = decode(ours, embeds, mask, max_new_tokens=24, eos_token_id=[STOP], pad_token_id=PAD)
        # make the most frequent generated token a stop token: rows end there and are padded after it
        stop = int(free[:, 1:].flatten().mode().values)
        cut = decode(ours, embeds, mask, max_new_tokens=24, eos_token_id=[stop], pad_token_id=PAD)
    for row_free, row_cut in zip(free, cut):
        hits = (row_free == stop).nonzero()
        if len(hits):
            k = int(hits[0])
            assert torch.equal(row_cut[: k + 1], row_free[: k + 1]) and (row_cut[k + 1:] == PAD).all()
    assert cut.shape[1] <= free.shape[1]


def test_static_cache_refuses_overflow_and_unknown_settings(pair):
    cache = StaticCache(num_layers=1, max_len=4)
    k = torch.zeros(1, 2, 3, 8)
    cache.update(k, k, 0)
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.update(k, k, 0)
    ours, _ = pair
    with pytest.raises(ValueError, match="does not implement"):
        decode(ours, torch.zeros(1, 2, 64), eos_token_id=[STOP], no_repeat_ngram_size=2)
