"""SigLIP vision encoder with NaViT-style variable resolution (the `vpm.` tower of MiniCPM-V 2.6).

Design choices, each matching the reference checkpoint (facts sheet §3):
- Input is a batch of "patch strips": every view [3, H, W] is laid out as [3, p, N*p] with its N = h*w patches
  side by side (row-major), right-padded with zeros to the longest strip. `pack_patch_strips` does the batching.
  A stride-p convolution over a strip gives one embedding per patch, in the view's row-major patch order.
- Position ids come from `tgt_sizes` (rows h, cols w), never from the mask: patch (i, j) of an h x w view takes
  the learned position of the fractional coordinate (i/h, j/w) bucketed onto the fixed G x G grid (G = 70 for
  980 / 14). The bucketing uses float32 `arange` + `bucketize(right=True)` exactly as the reference does, since
  a closed-form floor(G*i/h) differs at some exact multiples.
- Padded patches are masked out as attention keys with an additive dtype-min mask; no mask when all views are full.
- Pre-LN transformer layers, softmax in float32, tanh-approximated GELU, `post_layernorm` after the last layer.
- Two attention paths, "sdpa" (default, fast) and "eager" (explicit matmuls); they agree to rounding.
- `num_layers` builds fewer layers than the config lists (MiniCPM-V's `drop_vision_last_layer`).
- Gradient checkpointing: set `gradient_checkpointing = True` (on the encoder or on the transformer).

Submodule names equal HF `Idefics2VisionTransformer`, so checkpoints load by name.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mllm.model.configuration import VisionConfig

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


# ---- input batching ---------------------------------------------------------------------------------------------
def pack_patch_strips(pixel_values: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Batch patch strips [3, p, N_i*p] into ([B, 3, p, N_max*p], patch_attention_mask [B, 1, N_max]).

    Each strip is copied into a zero tensor, contiguous, so the patch convolution runs on its fast layout (a
    transposed view of the same values made it ~1.8x slower); the mask is True on the first N_i patches of view i.
    """
    if not pixel_values:
        raise ValueError("pack_patch_strips needs at least one view")
    channels, patch = pixel_values[0].shape[:2]
    for strip in pixel_values:
        if strip.dim() != 3 or strip.shape[:2] != (channels, patch) or strip.shape[2] % patch:
            raise ValueError(f"expected patch strips [{channels}, {patch}, N*{patch}], got {tuple(strip.shape)}")
    length = max(strip.shape[2] for strip in pixel_values)
    packed = pixel_values[0].new_zeros(len(pixel_values), channels, patch, length)  # (B, C, p, L)
    for i, strip in enumerate(pixel_values):
        packed[i, :, :, : strip.shape[2]] = strip
    n_patches = torch.tensor([strip.shape[2] // patch for strip in pixel_values], device=packed.device)
    positions = torch.arange(length // patch, device=packed.device)
    patch_attention_mask = (positions[None, :] < n_patches[:, None])[:, None, :]  # (B, 1, N_max)
    return packed, patch_attention_mask


# ---- position ids -----------------------------------------------------------------------------------------------
def bucket_coords(n_patches: Tensor | int, num_patches_per_side: int) -> Tensor:
    """Grid bucket of each of the n fractional coordinates 0, 1/n, ..., (n-1)/n (int64, length n).

    The ops mirror the reference bit for bit: `n_patches` is normally a 0-dim integer tensor taken from
    `tgt_sizes`, so `1 / n_patches` is a float32 step, and `arange` then accumulates it on the CPU.
    """
    if not isinstance(n_patches, Tensor):
        n_patches = torch.tensor(n_patches, dtype=torch.int32)
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side)  # G-1 inner edges
    fractional = torch.arange(0, 1 - 1e-6, 1 / n_patches.cpu())
    return torch.bucketize(fractional, boundaries, right=True)


def vision_position_ids(patch_attention_mask: Tensor, tgt_sizes: Tensor, num_patches_per_side: int) -> Tensor:
    """Position ids [B, N_max]: bucket_h * G + bucket_w at each view's valid slots, 0 at padded slots."""
    batch = patch_attention_mask.shape[0]
    valid = patch_attention_mask.reshape(batch, -1).cpu()  # (B, N_max)
    tgt_sizes = tgt_sizes.cpu()
    position_ids = torch.zeros(valid.shape, dtype=torch.long)
    for b in range(batch):
        rows = bucket_coords(tgt_sizes[b, 0], num_patches_per_side)
        cols = bucket_coords(tgt_sizes[b, 1], num_patches_per_side)
        ids = (rows[:, None] * num_patches_per_side + cols[None, :]).flatten()  # (h*w,)
        if ids.numel() != int(valid[b].sum()):
            raise ValueError(f"view {b}: tgt_sizes {tgt_sizes[b].tolist()} disagree with its patch mask "
                             f"({int(valid[b].sum())} valid patches)")
        position_ids[b, valid[b]] = ids
    return position_ids


# ---- modules, in data-flow order --------------------------------------------------------------------------------
class SiglipVisionEmbeddings(nn.Module):
    """Patch embedding (stride-p conv over the strips) plus learned positions on a G x G grid."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.num_patches_per_side
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, padding="valid")
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)
        # SigLIP's init (std 1/sqrt(width)), not nn.Embedding's N(0, 1): at unit scale the positions swamp the
        # patch content, and a tower trained from scratch then feeds the resampler image-independent features.
        nn.init.normal_(self.position_embedding.weight, std=config.hidden_size**-0.5)
        # Zero-mean filters: a flat patch (the background) maps to the bias alone and the response comes from
        # what differs inside the patch. Without this every patch token of a mostly plain image shares one large
        # component, and a tower trained from scratch collapses to image-independent output.
        # (Under DeepSpeed ZeRO-3 the weight is already a 1-D partition placeholder here; the checkpoint fills it.)
        with torch.no_grad():
            weight = self.patch_embedding.weight
            if weight.dim() == 4:
                weight -= weight.mean(dim=(1, 2, 3), keepdim=True)

    def forward(self, pixel_values: Tensor, patch_attention_mask: Tensor, tgt_sizes: Tensor) -> Tensor:
        weight = self.patch_embedding.weight
        patch_embeds = self.patch_embedding(pixel_values.to(weight.dtype))  # (B, D, 1, N_max)
        embeddings = patch_embeds.flatten(2).transpose(1, 2)  # (B, N_max, D)
        position_ids = vision_position_ids(patch_attention_mask, tgt_sizes, self.num_patches_per_side)
        return embeddings + self.position_embedding(position_ids.to(weight.device))


class SiglipAttention(nn.Module):
    """Multi-head self-attention; q, k, v and out projections all carry a bias."""

    def __init__(self, config: VisionConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        if self.head_dim * self.num_heads != config.hidden_size:
            raise ValueError(f"hidden_size {config.hidden_size} must divide by {self.num_heads} heads")
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.attn_implementation = attn_implementation
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        B, N, D = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        k = self.k_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        v = self.v_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        dropout = self.dropout if self.training else 0.0
        if self.attn_implementation == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout,
                                               scale=self.scale)
        elif self.attn_implementation == "eager":
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scale  # (B, nh, N, N)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            probs = F.dropout(probs, p=dropout, training=self.training)
            y = torch.matmul(probs, v)  # (B, nh, N, hd)
        else:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                             f"got {self.attn_implementation!r}")
        y = y.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.out_proj(y)


class SiglipMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"only hidden_act='gelu_pytorch_tanh' is supported, got {config.hidden_act!r}")
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: VisionConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config, attn_implementation)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), attention_mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: VisionConfig, num_layers: int, attn_implementation: str = "sdpa"):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config, attn_implementation) for _ in range(num_layers))
        self.gradient_checkpointing = False
        # transformers' activation_checkpointing_enable replaces this with its own (kwargs applied)
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    def forward(self, x: Tensor, attention_mask: Tensor | None) -> Tensor:
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_checkpoint:
                x = self._gradient_checkpointing_func(layer.__call__, x, attention_mask)
            else:
                x = layer(x, attention_mask)
        return x


class SiglipVisionTransformer(nn.Module):
    """Embeddings -> encoder layers -> post_layernorm; returns last_hidden_state [B, N_max, D]."""

    def __init__(self, config: VisionConfig, num_layers: int | None = None, *, attn_implementation: str = "sdpa"):
        super().__init__()
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
        num_layers = config.num_hidden_layers if num_layers is None else num_layers
        if not 0 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"num_layers must be in [0, {config.num_hidden_layers}], got {num_layers}")
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config, num_layers, attn_implementation)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def attn_implementation(self) -> str:
        layers = self.encoder.layers
        return layers[0].self_attn.attn_implementation if len(layers) else "sdpa"

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        if value not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {value!r}")
        for layer in self.encoder.layers:
            layer.self_attn.attn_implementation = value

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = bool(value)

    def forward(self, pixel_values: Tensor, patch_attention_mask: Tensor, tgt_sizes: Tensor) -> Tensor:
        if tgt_sizes is None:
            raise ValueError("tgt_sizes is required: positions come from (h, w), not from the strip-shaped mask")
        B = pixel_values.shape[0]
        hidden = self.embeddings(pixel_values, patch_attention_mask, tgt_sizes)  # (B, N_max, D)
        valid = patch_attention_mask.reshape(B, -1).to(hidden.device)  # (B, N_max)
        attention_mask = None
        if not bool(valid.all()):
            # Padded patches may not be attended to; padded queries still attend to the valid keys.
            attention_mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
            attention_mask = attention_mask.masked_fill(~valid, torch.finfo(hidden.dtype).min)
            attention_mask = attention_mask[:, None, None, :]  # (B, 1, 1, N_max), broadcast over heads and queries
        hidden = self.encoder(hidden, attention_mask)
        return self.post_layernorm(hidden)
