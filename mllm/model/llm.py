"""Qwen2-style decoder-only language model: the LLM of MiniCPM-V 2.6 (facts sheet §1.3, §2.1, §5.4).

Read top to bottom in the order data flows: token embeddings -> N x [RMSNorm -> attention -> residual ->
RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> lm_head.

Design choices
- Parameter names equal `transformers.Qwen2ForCausalLM`, so its checkpoints load unchanged; the rotary
  `inv_freq` is a non-persistent fp32 buffer, never in a state dict (`reset_buffers()` rebuilds it after meta).
- Grouped-query attention: `num_attention_heads` query heads share `num_key_value_heads` K/V heads. q/k/v
  projections carry a bias, o_proj does not. RoPE is rotate-half (non-interleaved) at the given position ids.
- RMSNorm is computed in fp32 and cast back to the input dtype before the weight multiply; logits are fp32.
- Three attention paths, picked by `config._attn_implementation`: "sdpa" (default), "eager" (fp32 softmax,
  can return the attention weights) and "flash_attention_2" (the flash-attn package on a CUDA GPU, through
  transformers' integration, which unpads by the 2-D mask; checked by scripts/gpu_check.sh where it exists). Asking for attention weights uses the eager path for that call. SDPA
  handles GQA itself (`enable_gqa`) where that keeps a fast kernel; a single decoding query folds each K/V
  group's query heads into the query axis, so K/V are never repeated then either.
- One boolean mask (True = attend) is built per forward from the 2-D `attention_mask` (1 = keep, 0 = pad),
  causality and the KV-cache length; it is skipped altogether when nothing is padded. Query rows with no
  visible key (left-padding positions) attend to every key instead, so they stay finite; their outputs are
  meaningless and must be ignored by the caller, as in any padded batch.
- KV cache: anything with `update(k, v, layer_idx)` and `get_seq_length()`: `transformers.DynamicCache`, so
  `GenerationMixin.generate` (beam search, `inputs_embeds=`) runs unchanged, or `mllm.model.decode.StaticCache`
  (our decode loop). `generate` derives position ids from the attention mask (left padding).
- Speed: besides the above, a few element-wise ops write into a temporary they just created (`mul_`,
  `addcmul_`), which saves allocating large buffers on CPU; autograd supports all of them. No hooks,
  decorators or per-layer mask building in the hot path. For CPU inference `pack_linears` may route q/k/v and
  gate/up through one product each (`FUSABLE`: the layers that read the same input); the parameters stay apart.
- No built-in loss: the MLLM's labels are pre-shifted, use `mllm.train.losses`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from mllm.model.configuration import LLMConfig


class LLMRMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back before the weight multiply."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.numel() <= 16 * x.shape[-1]:
            # Decoding (a few rows): torch's fused kernel, bit-identical to the lines below in float32 and ~2x
            # faster there; with many rows it is the slower one (measured 2-4x at 128-4096 rows).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)  # (B, T, C)
        return normed.mul_(self.weight)  # `normed` is a fresh temporary: scale it in place


class LLMRotaryEmbedding(nn.Module):
    """cos/sin for rotate-half RoPE with inv_freq_i = theta^(-2i/head_dim)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponents)  # (hd/2,), fp32

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute `inv_freq` (not in checkpoints), e.g. after building on meta or `to_empty()`."""
        self.inv_freq = self.compute_inv_freq(self.inv_freq.device if device is None else device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:  # model.to(bf16) casts buffers too; rotation angles need fp32
            inv_freq = self.compute_inv_freq(inv_freq.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        # rotate_half(x) * sin == roll(x, hd/2) * cat(-sin, sin): the sign is folded into `sin` here, once per
        # forward, so each layer rotates q and k with one roll instead of slice + neg + cat.
        cos = torch.cat((cos, cos), dim=-1)  # (B, T, hd)
        sin = torch.cat((-sin, sin), dim=-1)  # (B, T, hd)
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # (B, 1, T, hd) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x: (B, h, T, hd); cos, sin from LLMRotaryEmbedding (sign folded)."""
    return (x * cos).addcmul_(x.roll(x.shape[-1] // 2, dims=-1), sin)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, S, hd) -> (B, nkv * n_rep, S, hd): each K/V head repeated for the query heads of its group."""
    if n_rep == 1:
        return x
    B, n_kv, S, hd = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, S, hd).reshape(B, n_kv * n_rep, S, hd)


class LLMAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: LLMConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        self.n_rep = self.n_head // self.n_kv_head  # query heads per K/V head
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=False)
        self.fused_qkv = None  # set for CPU inference by mllm.model.cpu_linear.pack_linears (see FUSABLE)

    FUSABLE = {"fused_qkv": ("q_proj", "k_proj", "v_proj")}  # linears reading the same input, in output order

    def forward(self, x, cos, sin, mask, is_causal, cache=None, eager=False):
        """x: (B, T, C); mask: bool (B or 1, 1, T, S) with True = attend, or None (then `is_causal` says
        whether to apply a plain causal mask). Returns the output (B, T, C) and, on the eager path, the
        attention weights (B, nh, T, S)."""
        B, T, _ = x.shape
        q, k, v = self.fused_qkv(x) if self.fused_qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, S, hd), S = past + T
        dropout = self.config.attention_dropout if self.training else 0.0

        weights = None
        if self.config._attn_implementation == "flash_attention_2" and not eager:
            # `mask` is the 2-D padding mask here (or None); flash-attn takes K/V with fewer heads as they are
            y, _ = flash_attention_forward(self, q, k, v, mask, dropout=dropout, scaling=self.scale, is_causal=True)
            return self.o_proj(y.reshape(B, T, -1)), None  # y: (B, T, nh, hd)
        if eager:
            y, weights = self.eager_attention(q, k, v, mask, dropout)  # (B, nh, T, hd)
        elif self.n_rep > 1 and T == 1:
            # One query per sequence: fold each K/V group's query heads into the query-length axis, so
            # attention runs on the K/V heads directly without repeating them.
            y = F.scaled_dot_product_attention(
                q.view(B, self.n_kv_head, self.n_rep, self.head_dim), k, v,  # q: (B, nkv, n_rep, hd)
                attn_mask=mask, dropout_p=dropout, scale=self.scale,
            )  # (B, nkv, n_rep, hd): head order kv * n_rep + r, as in (B, nh, 1, hd)
        else:
            # SDPA's native GQA keeps the fused kernels on CPU, and on GPUs only without a mask (with a mask it
            # would fall back to the slow math kernel there): repeat K/V in that one case.
            gqa = self.n_rep > 1 and (mask is None or q.device.type == "cpu")
            if not gqa:
                k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # (B, nh, S, hd)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale, enable_gqa=gqa
            )  # (B, nh, T, hd)
        y = y.reshape(B, self.n_head, T, self.head_dim).transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hd)
        return self.o_proj(y), weights

    def eager_attention(self, q, k, v, mask, dropout):
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)  # (B, nh, S, hd)
        scores = (q @ k.transpose(-2, -1)).float() * self.scale  # (B, nh, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        weights = scores.softmax(dim=-1).to(q.dtype)  # fp32 softmax
        y = F.dropout(weights, p=dropout, training=self.training) @ v  # (B, nh, T, hd)
        return y, weights


class LLMMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {config.hidden_act!r}")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused_gate_up = None  # set for CPU inference by mllm.model.cpu_linear.pack_linears

    FUSABLE = {"fused_gate_up": ("gate_proj", "up_proj")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fused_gate_up(x) if self.fused_gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate).mul_(up))  # in place on silu's output


class LLMDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LLMAttention(config, layer_idx)
        self.post_attention_layernorm = LLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LLMMLP(config)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, eager=False):
        attn_out, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, eager)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, weights


def build_attention_mask(attention_mask, T: int, past: int, device, explicit: bool):
    """Boolean mask (True = attend) of shape (B or 1, 1, T, S), S = past + T, or None.

    Returns (mask, is_causal). Without padding the mask is dropped where SDPA can do without it: a single
    query sees every key, and a prefill with no cache can use SDPA's own `is_causal`. `explicit` forces a
    real causal mask (the eager path needs one).
    """
    S = past + T
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != S:
            raise ValueError(
                f"attention_mask must be 2-D (batch, past + new tokens) = (B, {S}), got {tuple(attention_mask.shape)}"
            )
        if bool(attention_mask.all()):
            attention_mask = None
    if attention_mask is None and not explicit:
        if T == 1:
            return None, False
        if past == 0:
            return None, True
    # Query t sits at absolute position past + t and sees keys 0..past + t.
    causal = torch.arange(S, device=device)[None, :] <= torch.arange(past, S, device=device)[:, None]  # (T, S)
    mask = causal[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        mask = mask | ~mask.any(dim=-1, keepdim=True)  # rows with no visible key attend everywhere (no NaN)
    return mask, False


class LLMPreTrainedModel(PreTrainedModel):
    config_class = LLMConfig
    config: LLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLMDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            # As Qwen2: the pad row starts at zero (and gets no gradient). A slice loses the "already loaded"
            # flag that the `init` functions honour, so check it here or loading would zero a trained row.
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, LLMRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LLMRotaryEmbedding):  # non-persistent: recompute after meta-device loading
            init.copy_(module.inv_freq, module.compute_inv_freq())


class LLMModel(LLMPreTrainedModel):
    """Embeddings + decoder layers + final norm; returns the last hidden state (B, T, C)."""

    def __init__(self, config: LLMConfig):
        super().__init__(config)
        if config.use_sliding_window:
            raise NotImplementedError("sliding-window attention is not supported (MiniCPM-V 2.6 does not use it)")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LLMRotaryEmbedding(config)
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_attentions=False, output_hidden_states=False) -> BaseModelOutputWithPast:
        """A given `cache` is always used and extended; `use_cache` only decides whether to start one."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if use_cache is None:  # no cache by default in training: it would only copy K/V
            use_cache = self.config.use_cache and not self.training
        checkpointing = self.gradient_checkpointing and self.training
        if checkpointing:
            if cache is not None:
                raise ValueError("a KV cache cannot be used with gradient checkpointing in training")
            use_cache = False  # a recomputed layer would append to the cache a second time
        if use_cache and cache is None:
            cache = DynamicCache()  # full attention everywhere; layers are created on first update
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None]  # (1, T), shared by the batch

        eager = output_attentions or self.config._attn_implementation == "eager"
        if self.config._attn_implementation == "flash_attention_2" and not eager:
            padded = attention_mask is not None and not bool(attention_mask.all())
            mask, is_causal = (attention_mask if padded else None), True  # flash-attn unpads by the 2-D mask
        else:
            mask, is_causal = build_attention_mask(attention_mask, T, past, x.device, explicit=eager)
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # (B or 1, 1, T, hd) each

        all_hidden, all_weights = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(x)
            if checkpointing:  # keep only the layer input; recompute the rest in backward
                x, weights = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, mask, is_causal, None,
                                                               eager)
            else:
                x, weights = layer(x, cos, sin, mask, is_causal, cache, eager)
            if output_attentions:
                all_weights.append(weights)
        x = self.norm(x)
        if output_hidden_states:
            all_hidden.append(x)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_weights) if output_attentions else None,
        )


class LLMForCausalLM(LLMPreTrainedModel, GenerationMixin):
    """LLMModel + lm_head (no bias; tied to the embeddings only if `tie_word_embeddings`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LLMConfig):
        super().__init__(config)
        self.model = LLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # `generate` would build its cache as DynamicCache(config=...), which reads LLMConfig's `sliding_window`
        # (set even though `use_sliding_window` is False) as a real window and drops old keys. Returning False
        # lets the first forward create a plain full-attention DynamicCache instead; generate carries it on.
        return False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_attentions=False, logits_to_keep=0, output_hidden_states=False,
                past_key_values=None, labels=None, return_dict=None) -> CausalLMOutputWithPast:
        """Returns logits: fp32 (B, T or logits_to_keep, vocab); cache: the DynamicCache or None; attentions and
        hidden_states: per-layer tuples when asked for. `past_key_values` is the pre-v5 name of `cache`;
        `return_dict` is accepted for GenerationMixin and ignored (the output is always a ModelOutput)."""
        if labels is not None:
            raise ValueError("LLMForCausalLM has no built-in loss (labels are pre-shifted): use mllm.train.losses")
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("pass only one of cache and past_key_values")
            cache = past_key_values
        out = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h  # (B, k, C)
        else:  # a tensor of sequence indices
            h = h[:, logits_to_keep]
        logits = self.lm_head(h).float()  # (B, k, vocab)
        return CausalLMOutputWithPast(
            logits=logits, cache=out.cache, hidden_states=out.hidden_states, attentions=out.attentions
        )
