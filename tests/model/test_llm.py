"""Parity of mllm.model.llm with transformers' Qwen2ForCausalLM on a tiny config (CPU, float32)."""

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from mllm.model.configuration import LLMConfig
from mllm.model.llm import LLMForCausalLM

TOL = 1e-4
VOCAB = 256
PAD = 0  # token id used for padding in these tests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine idle-waiting threads cost a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides) -> LLMConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=512, rms_norm_eps=1e-6,
                  pad_token_id=PAD)
    kwargs.update(overrides)
    return LLMConfig(**kwargs)


def qwen2_config(cfg: LLMConfig, attn: str = "sdpa") -> Qwen2Config:
    qcfg = Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=cfg.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    qcfg._attn_implementation = attn
    return qcfg


def make_pair(attn: str = "sdpa", seed: int = 0, **overrides):
    """Our model with random weights, and a Qwen2ForCausalLM holding the same weights."""
    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    cfg._attn_implementation = attn
    ours = LLMForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so that a wrong one shows up in the logits
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    theirs = Qwen2ForCausalLM(qwen2_config(cfg, attn)).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def ids_batch(B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (B, T), generator=g)


def max_diff(a, b):
    return (a - b).abs().max().item()


# 1-2. plain forward, with and without padding ----------------------------------------------------------------------
def test_logits_match_qwen2_without_padding(pair):
    ours, theirs = pair
    ids = ids_batch()
    with torch.no_grad():
        out = ours(ids)
        ref = theirs(ids).logits
    assert out.logits.dtype == torch.float32 and out.logits.shape == (2, 12, VOCAB)
    assert max_diff(out.logits, ref) <= TOL


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mask_positions", [False, True])
def test_logits_match_qwen2_with_padding(pair, side, mask_positions):
    ours, theirs = pair
    ids = ids_batch(B=3, T=10)
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate([0, 3, 6]):
        if n_pad:
            pad = slice(0, n_pad) if side == "left" else slice(10 - n_pad, 10)
            mask[row, pad] = 0
            ids[row, pad] = PAD
    kwargs = dict(attention_mask=mask)
    if mask_positions:  # positions counted over real tokens only, as generate() does
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = ours(ids, **kwargs).logits
        ref = theirs(ids, **kwargs).logits
    keep = mask.bool()
    assert torch.isfinite(logits).all(), "fully masked (padding) query rows must not produce NaN"
    assert max_diff(logits[keep], ref[keep]) <= TOL


# 3. KV cache -------------------------------------------------------------------------------------------------------
def test_kv_cache_steps_equal_full_forward(pair):
    ours, theirs = pair
    ids = ids_batch(B=2, T=14)
    with torch.no_grad():
        full = theirs(ids).logits
        out = ours(ids[:, :6], use_cache=True)
        assert isinstance(out.cache, DynamicCache) and out.cache.get_seq_length() == 6
        pieces, cache = [out.logits], out.cache
        chunk = ours(ids[:, 6:9], cache=cache, use_cache=True)  # a multi-token chunk on top of a cache
        pieces.append(chunk.logits)
        for t in range(9, 14):  # then single-token steps
            step = ours(ids[:, t : t + 1], cache=cache, use_cache=True)
            pieces.append(step.logits)
        assert cache.get_seq_length() == 14
    assert max_diff(torch.cat(pieces, dim=1), full) <= TOL


def test_kv_cache_with_left_padding_and_past_key_values_alias(pair):
    ours, theirs = pair
    ids = ids_batch(B=2, T=12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = PAD
    with torch.no_grad():
        full = theirs(ids, attention_mask=mask).logits
        out = ours(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        pieces, cache = [out.logits], out.cache
        for t in range(8, 12):
            step = ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
            pieces.append(step.logits)
    keep = mask.bool()
    assert max_diff(torch.cat(pieces, dim=1)[keep], full[keep]) <= TOL


# 4. eager vs sdpa --------------------------------------------------------------------------------------------------
def test_eager_matches_sdpa_and_returns_attention_weights():
    ours, _ = make_pair(attn="sdpa")
    eager, theirs_eager = make_pair(attn="eager")
    ids = ids_batch(B=2, T=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        sdpa_logits = ours(ids, attention_mask=mask).logits
        out = eager(ids, attention_mask=mask, output_attentions=True)
        ref = theirs_eager(ids, attention_mask=mask, output_attentions=True)
    keep = mask.bool()
    assert max_diff(out.logits[keep], sdpa_logits[keep]) <= TOL
    assert len(out.attentions) == 3
    for w, w_ref in zip(out.attentions, ref.attentions):
        assert w.shape == (2, 4, 9, 9)
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 9), atol=1e-5)
        assert max_diff(w[1], w_ref[1]) <= 1e-5  # the unpadded row equals Qwen2's eager weights
        assert max_diff(w[0, :, 3:], w_ref[0, :, 3:]) <= 1e-5  # real query rows of the padded one
    with torch.no_grad():  # with a cache: weights over all S = past + T keys
        prefill = eager(ids[:, :5], use_cache=True)
        step = eager(ids[:, 5:7], cache=prefill.cache, output_attentions=True)
    assert step.attentions[0].shape == (2, 4, 2, 7)


def test_sdpa_model_returns_attention_weights_on_request(pair):
    ours, _ = pair
    with torch.no_grad():
        out = ours(ids_batch(B=1, T=5), output_attentions=True)
    assert out.attentions[0].shape == (1, 4, 5, 5)


# 5-6. generate -----------------------------------------------------------------------------------------------------
GEN = dict(max_new_tokens=10, min_new_tokens=10, pad_token_id=PAD)


def test_generate_greedy_matches_qwen2(pair):
    ours, theirs = pair
    ids = ids_batch(B=2, T=7)
    with torch.no_grad():
        a = ours.generate(ids, do_sample=False, **GEN)
        b = theirs.generate(ids, do_sample=False, **GEN)
        embeds = ours.get_input_embeddings()(ids)
        mask = torch.ones_like(ids)
        c = ours.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, **GEN)
        d = theirs.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, **GEN)
    assert a.shape == (2, 17) and torch.equal(a, b)
    assert torch.equal(c, d) and torch.equal(c, a[:, 7:])  # from embeddings only the new tokens come back


def test_generate_keeps_full_attention_past_the_unused_sliding_window():
    # LLMConfig keeps `sliding_window` set while `use_sliding_window` is False; the cache must not apply it.
    ours, theirs = make_pair(sliding_window=4)
    ids = ids_batch(B=2, T=7)
    with torch.no_grad():
        a = ours.generate(ids, do_sample=False, **GEN)
        b = theirs.generate(ids, do_sample=False, **GEN)
    assert torch.equal(a, b)


def test_left_padded_batch_generates_like_each_prompt_alone(pair):
    ours, _ = pair
    prompts = [ids_batch(B=1, T=n, seed=10 + n)[0] for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), PAD)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    with torch.no_grad():
        batch = ours.generate(ids, attention_mask=mask, do_sample=False, **GEN)[:, width:]
        embeds = ours.get_input_embeddings()(ids)
        batch_embeds = ours.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, **GEN)
        for row, p in enumerate(prompts):
            alone = ours.generate(p[None], do_sample=False, **GEN)[0, len(p):]
            assert torch.equal(batch[row], alone), f"prompt {row}"
            assert torch.equal(batch_embeds[row], alone), f"prompt {row} (inputs_embeds)"


def test_sampling_and_beam_search_through_generate(pair):
    ours, theirs = pair
    ids = ids_batch(B=2, T=6)
    with torch.no_grad():
        greedy = ours.generate(ids, do_sample=False, **GEN)
        one_beam = ours.generate(ids, do_sample=False, num_beams=1, **GEN)
        no_cache = ours.generate(ids, do_sample=False, use_cache=False, **GEN)
        beams = ours.generate(ids, do_sample=False, num_beams=3, num_return_sequences=2, **GEN)
        beams_ref = theirs.generate(ids, do_sample=False, num_beams=3, num_return_sequences=2, **GEN)
        torch.manual_seed(123)
        sample = ours.generate(ids, do_sample=True, top_k=20, temperature=0.9, **GEN)
        torch.manual_seed(123)
        sample_ref = theirs.generate(ids, do_sample=True, top_k=20, temperature=0.9, **GEN)
    assert torch.equal(one_beam, greedy) and torch.equal(no_cache, greedy)
    assert beams.shape == (4, 16) and torch.equal(beams, beams_ref)
    assert sample.shape == (2, 16) and torch.equal(sample, sample_ref)


# 7. gradient checkpointing -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_equal_grads(reentrant):
    ours, _ = make_pair()
    ours.train()
    ids = ids_batch(B=2, T=10)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0

    def grads():
        ours.zero_grad()
        logits = ours(ids, attention_mask=mask).logits
        logits.float().logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    assert ours(ids).cache is None  # no KV cache by default in training mode
    plain = grads()
    with pytest.warns(FutureWarning):  # transformers v5 renamed it activation_checkpointing_enable
        ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert ours.model.gradient_checkpointing
    calls = []
    original = ours.model._gradient_checkpointing_func
    ours.model._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or original(*a, **k)
    checkpointed = grads()
    assert len(calls) == 3  # one checkpoint per layer: the path really ran
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], atol=1e-6), name


def test_training_grads_match_qwen2():
    ours, theirs = make_pair()
    ours.train(), theirs.train()
    ids = ids_batch(B=2, T=10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as in training batches
    ids[1, 7:] = PAD
    for model in (ours, theirs):
        logits = model(ids, attention_mask=mask, use_cache=False).logits
        logits.float().logsumexp(-1)[mask.bool()].mean().backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert max_diff(p.grad, theirs_grads[name].grad) <= 1e-5, name
    assert (ours.model.embed_tokens.weight.grad[PAD] == 0).all()  # padding_idx, as in Qwen2


# 8. construction, parameter names and count ------------------------------------------------------------------------
def closed_form_params(c: LLMConfig) -> int:
    hd = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn = (c.hidden_size * q + q) + 2 * (c.hidden_size * kv + kv) + q * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    layer = attn + mlp + 2 * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size + head


def test_meta_device_parameter_count_and_state_dict_names():
    cfg = tiny_config(vocab_size=151666, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4)
    with torch.device("meta"):
        model = LLMForCausalLM(cfg)
        ref = Qwen2ForCausalLM(qwen2_config(cfg))
    n = sum(p.numel() for p in model.parameters())
    assert n == closed_form_params(cfg) == sum(p.numel() for p in ref.parameters())
    assert sorted(model.state_dict()) == sorted(ref.state_dict())
    assert not any("rotary" in k or "inv_freq" in k for k in model.state_dict())
    rotary = model.model.rotary_emb
    rotary.reset_buffers(device="cpu")  # how a loader materialises the non-persistent buffer after meta
    assert rotary.inv_freq.device.type == "cpu"
    assert torch.allclose(rotary.inv_freq[:2], torch.tensor([1.0, 1e6 ** -(2 / 128)]))  # theta^(-2i/head_dim)
    small = LLMForCausalLM(tiny_config())
    assert small.lm_head.weight is not small.model.embed_tokens.weight
    assert small.model.layers[0].self_attn.o_proj.bias is None
    assert (small.model.layers[0].self_attn.q_proj.bias == 0).all() and (small.model.norm.weight == 1).all()
    std = small.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.015 < std < 0.025  # initializer_range 0.02
    tied = LLMForCausalLM(tiny_config(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_save_and_from_pretrained_round_trip(tmp_path):
    ours, _ = make_pair(pad_token_id=3)
    with torch.no_grad():
        ours.model.embed_tokens.weight[3] = 1.0  # a trained pad row must survive loading
    ours.save_pretrained(tmp_path)
    loaded = LLMForCausalLM.from_pretrained(tmp_path).eval()  # built on meta, buffers recomputed
    assert torch.equal(loaded.model.rotary_emb.inv_freq, ours.model.rotary_emb.inv_freq)
    ids = ids_batch(B=1, T=8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_labels_are_refused_and_logits_to_keep(pair):
    ours, _ = pair
    ids = ids_batch(B=1, T=6)
    with pytest.raises(ValueError, match="mllm.train.losses"):
        ours(ids, labels=ids)
    with torch.no_grad():
        full = ours(ids).logits
        last = ours(ids, logits_to_keep=1).logits
    assert last.shape == (1, 1, VOCAB) and max_diff(last[:, 0], full[:, -1]) <= 1e-6


def test_bfloat16_close_to_qwen2():
    ours, theirs = make_pair()
    ours.to(torch.bfloat16)
    theirs.to(torch.bfloat16)
    ids = ids_batch(B=2, T=12)
    with torch.no_grad():
        a = ours(ids).logits
        b = theirs(ids).logits.float()
    assert a.dtype == torch.float32
    assert max_diff(a, b) <= 0.05 * b.abs().max().item()


def test_rmsnorm_decode_path_is_bit_identical():
    """A few rows take torch's fused rms_norm; it must equal the explicit fp32 formula bit for bit."""
    from mllm.model.llm import LLMRMSNorm

    torch.manual_seed(0)
    norm = LLMRMSNorm(96, 1e-6)
    norm.weight.data.normal_()
    for shape in [(1, 1, 96), (8, 1, 96), (2, 8, 96)]:
        x = torch.randn(*shape) * 3
        xf = x.float()
        explicit = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)) * norm.weight
        assert torch.equal(norm(x), explicit), shape
