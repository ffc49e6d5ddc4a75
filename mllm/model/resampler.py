"""Perceiver resampler: one cross-attention layer that turns a view's h*w vision features into Q tokens.

Design choices, each matching the reference checkpoint (facts sheet §4):
- Q learned queries (64 for MiniCPM-V 2.6) attend over the view's patch features through a standard
  `nn.MultiheadAttention` (seq-first layout, packed in_proj, softmax in the activation dtype).
- The keys carry a fixed 2-D sin-cos position (MAE style): for patch (row h, col w) the first half of the channels
  encodes the column w and the second half the row h, each as all sines then all cosines. Values and queries get
  no position. The table is computed in numpy float32 and kept in a non-persistent `pos_embed` buffer of shape
  (H, W, D), regrown (never shrunk) when a view has more rows or columns than it.
- Order: kv_proj -> ln_kv (-> + pos for the keys); query -> ln_q; attention -> ln_post -> `@ proj`.
  `proj` is a raw [D, D] matrix applied on the right, so the equivalent nn.Linear weight is proj.T.
- Every view yields exactly Q tokens whatever its size; padded patches (t >= h*w) are masked out as keys.
- Not the reference's, opt-in (`relative_grid`, the config's `resampler_positions: "relative"`): a view's patch
  centres scaled onto a G x G grid, so that a key's position says where in the image it lies whatever the view's
  shape (patch (h, w) of an H x W view sits at ((h + 1/2) G/H - 1/2, (w + 1/2) G/W - 1/2)); a G x G view gets the
  absolute table's entries exactly. A query that stands for one region of the image then finds it at the same
  position on every grid (the tiny course model: docs/probes/README.md, "Stop 46").
- Not the reference's, opt-in (`query_layers`, the config's `resampler_query_layers`): that many pre-norm transformer
  layers over a view's Q attended tokens, between the attention and ln_post, so that each token can see the others
  (a count is a fact about the whole image, which one cross-attention of fixed queries does not gather; measured
  not to carry it in the tiny course model, docs/probes/README.md, "Stop 46").
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


# ---- 2-D sin-cos position table ---------------------------------------------------------------------------------
def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[..., dim] encoding of float32 positions: dim/2 sines then dim/2 cosines, frequencies 10000^(-k/(dim/2))."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega  # (dim/2,) float32
    angles = positions[..., None] * omega  # (..., dim/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int]) -> np.ndarray:
    """float32 table [H, W, D]: entry (h, w) = concat(sincos_1d(D/2, w), sincos_1d(D/2, h))."""
    height, width = grid_size
    return sincos_2d_at(embed_dim, np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32))


def sincos_2d_at(embed_dim: int, row_positions: np.ndarray, col_positions: np.ndarray) -> np.ndarray:
    """float32 table [H, W, D] for rows at row_positions [H] and columns at col_positions [W]."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for the 2-D sin-cos table, got {embed_dim}")
    # meshgrid with xy indexing: cols[h, w] = col w, rows[h, w] = row h; the column coordinate fills the first half.
    cols, rows = np.meshgrid(col_positions.astype(np.float32), row_positions.astype(np.float32))
    return np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=-1)


def relative_positions(length: int, grid: int) -> np.ndarray:
    """float32 [length]: the centres of `length` equal parts of a side, in units of a `grid`-cell side
    (`length == grid` gives 0, 1, ..., grid - 1 exactly)."""
    return ((np.arange(length, dtype=np.float32) + np.float32(0.5)) * np.float32(grid / length)
            - np.float32(0.5)).astype(np.float32)


# ---- module -----------------------------------------------------------------------------------------------------
class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int,
                 max_size: tuple[int, int] = (70, 70), norm_eps: float = 1e-6, relative_grid: int | None = None,
                 query_layers: int = 0):
        super().__init__()
        if relative_grid is not None and relative_grid < 1:
            raise ValueError(f"relative_grid must be a positive number of cells, got {relative_grid}")
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.max_size = (int(max_size[0]), int(max_size[1]))  # rows, cols held by pos_embed; only grows
        self.relative_grid = relative_grid  # None: absolute patch positions (the reference's)
        self._relative_tables: dict[tuple[int, int, torch.device], Tensor] = {}

        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.ln_post = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.proj = nn.Parameter(torch.empty(embed_dim, embed_dim))
        # absent (not empty) by default, so that the reference's state-dict names and parameter count stay as they are
        if query_layers:
            self.query_layers = nn.ModuleList(
                nn.TransformerEncoderLayer(embed_dim, num_heads, dim_feedforward=embed_dim, dropout=0.0,
                                           activation="gelu", layer_norm_eps=norm_eps, batch_first=True,
                                           norm_first=True)
                for _ in range(query_layers))
        self.register_buffer("pos_embed", torch.empty(0, device=self.query.device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference init: trunc-normal(0.02) query and Linear weights (zero bias), MultiheadAttention's own
        xavier in_proj, LayerNorm ones/zeros, proj = D^-0.5 * randn; then (re)build the position table."""
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn._reset_parameters()
        for layer in getattr(self, "query_layers", ()):
            layer.self_attn._reset_parameters()
        with torch.no_grad():
            # Sharper first attention than xavier gives (scores x16): with near-uniform attention every query
            # averages the same patches, and a resampler trained from scratch starts (and stays) image-blind.
            self.attn.in_proj_weight[: 2 * self.embed_dim] *= 4.0
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.proj.copy_(self.embed_dim**-0.5 * torch.randn_like(self.proj))
        self.reset_buffers()

    # ---- position cache -----------------------------------------------------------------------------------------
    def _build_pos_embed(self, device: torch.device) -> None:
        shape = (*self.max_size, self.embed_dim)
        if device.type == "meta":
            self.pos_embed = torch.empty(shape, device=device)
        else:
            self.pos_embed = torch.from_numpy(sincos_2d(self.embed_dim, self.max_size)).to(device)  # (H, W, D)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the non-persistent position table, e.g. after building on meta or `to_empty()`."""
        device = self.query.device if device is None else torch.device(device)
        self._build_pos_embed(device)

    def _pos_embed_intact(self) -> bool:
        # Entry (0, 0) is sin(0)=0 / cos(0)=1 in each quarter, exactly, in any dtype. A table left on meta or
        # materialised by `to_empty()` (non-persistent buffers are not in checkpoints) fails this check.
        if self.pos_embed.is_meta or self.pos_embed.shape[:2] != self.max_size:
            return False
        quarter = self.embed_dim // 4
        expected = torch.tensor([0.0, 1.0, 0.0, 1.0], device=self.pos_embed.device).repeat_interleave(quarter)
        return torch.equal(self.pos_embed[0, 0], expected.to(self.pos_embed.dtype))

    def _adjust_pos_cache(self, max_h: int, max_w: int, device: torch.device) -> None:
        grow = max_h > self.max_size[0] or max_w > self.max_size[1]
        if grow:
            self.max_size = (max(max_h, self.max_size[0]), max(max_w, self.max_size[1]))
        if grow or not self._pos_embed_intact():
            self._build_pos_embed(device)

    def _relative_table(self, h: int, w: int, device: torch.device) -> Tensor:
        key = (h, w, device)
        if key not in self._relative_tables:
            table = sincos_2d_at(self.embed_dim, relative_positions(h, self.relative_grid),
                                 relative_positions(w, self.relative_grid))
            self._relative_tables[key] = torch.from_numpy(table).to(device)  # (h, w, D)
        return self._relative_tables[key]

    def positions(self, h: int, w: int, device: torch.device) -> Tensor:
        """[h*w, D] key positions of an h x w view."""
        table = self.pos_embed[:h, :w] if self.relative_grid is None else self._relative_table(h, w, device)
        return table.reshape(h * w, self.embed_dim)

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, tgt_sizes: Tensor) -> Tensor:
        """x [B, L, kv_dim] (view b valid for t < h_b*w_b), tgt_sizes [B, 2] (rows, cols) -> [B, Q, D]."""
        B, L, _ = x.shape
        if tgt_sizes.shape != (B, 2):
            raise ValueError(f"tgt_sizes must be [{B}, 2], got {tuple(tgt_sizes.shape)}")
        sizes = [(int(h), int(w)) for h, w in tgt_sizes.tolist()]
        lengths = [h * w for h, w in sizes]
        if max(lengths) > L:
            raise ValueError(f"a view has {max(lengths)} patches but x holds only {L} per view")
        if self.relative_grid is None:
            self._adjust_pos_cache(max(h for h, _ in sizes), max(w for _, w in sizes), x.device)

        pos = torch.zeros(B, L, self.embed_dim, dtype=x.dtype, device=x.device)  # (B, L, D), 0 at padding
        for b, (h, w) in enumerate(sizes):
            pos[b, : h * w] = self.positions(h, w, x.device).to(x.dtype)
        key_padding_mask = torch.arange(L, device=x.device)[None, :] >= torch.tensor(lengths, device=x.device)[:, None]

        kv = self.ln_kv(self.kv_proj(x))  # (B, L, D)
        q = self.ln_q(self.query)  # (Q, D)
        out = self.attn(
            q.unsqueeze(1).repeat(1, B, 1),  # (Q, B, D)
            (kv + pos).transpose(0, 1),  # keys (L, B, D)
            kv.transpose(0, 1),  # values (L, B, D)
            key_padding_mask=key_padding_mask,  # (B, L), True = ignore
        )[0]  # (Q, B, D)
        out = out.transpose(0, 1)  # (B, Q, D)
        for layer in getattr(self, "query_layers", ()):
            out = layer(out)  # (B, Q, D), every token of a view attending to every other
        out = self.ln_post(out)
        return out @ self.proj
