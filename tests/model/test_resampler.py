"""Perceiver resampler: position table by hand, explicit-matrix re-implementation, padding, adaptive cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from mllm.model.resampler import Resampler, relative_positions, sincos_2d

D, KV, Q, HEADS = 32, 24, 8, 4


def make_resampler(max_size=(70, 70)) -> Resampler:
    torch.manual_seed(0)
    r = Resampler(Q, D, HEADS, KV, max_size=max_size).eval()
    with torch.no_grad():  # non-trivial norms and biases, so the test sees every parameter
        for name, p in r.named_parameters():
            if name.startswith("ln_") or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return r


def features(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(h * w, KV, generator=torch.Generator().manual_seed(seed))


def pad_batch(feats: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)  # (B, L_max, KV), zeros at padding


def table_entry(h: int, w: int, c: int, dim: int) -> float:
    """Facts §4.1 written out: quarter 0 sin(w*om), 1 cos(w*om), 2 sin(h*om), 3 cos(h*om); om_k = 1e4^(-k/(dim/4))."""
    quarter = dim // 4
    part, k = divmod(c, quarter)
    angle = (w if part < 2 else h) / 10000 ** (k / quarter)
    return math.sin(angle) if part % 2 == 0 else math.cos(angle)


def test_position_table_matches_hand_values():
    dim = 64
    table = sincos_2d(dim, (70, 70))
    assert table.shape == (70, 70, dim) and str(table.dtype) == "float32"
    for h, w, c in [(0, 0, 0), (0, 0, 16), (3, 5, 0), (3, 5, 1), (3, 5, 17), (3, 5, 32), (3, 5, 49),
                    (69, 2, 7), (2, 69, 23), (41, 13, 63), (13, 41, 40)]:
        assert table[h, w, c] == pytest.approx(table_entry(h, w, c, dim), abs=2e-5), (h, w, c)
    # A non-square grid: rows index h, columns index w, and a bigger table extends a smaller one.
    small, big = sincos_2d(dim, (3, 5)), sincos_2d(dim, (6, 9))
    assert small.shape == (3, 5, dim) and (big[:3, :5] == small).all()
    assert small[2, 4, 0] == pytest.approx(math.sin(4.0), abs=1e-6)  # column 4 in the first half
    assert small[2, 4, 32] == pytest.approx(math.sin(2.0), abs=1e-6)  # row 2 in the second half


def explicit_resampler(r: Resampler, x: torch.Tensor, h: int, w: int,
                       at: tuple[list[float], list[float]] | None = None) -> torch.Tensor:
    """One unpadded view with plain matrix ops: x [h*w, KV] -> [Q, D]; keys at rows/columns `at` (patch
    indices when None)."""
    def layer_norm(t, ln):
        mean = t.mean(-1, keepdim=True)
        var = t.var(-1, unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-6) * ln.weight + ln.bias

    rows, cols = at if at is not None else (list(range(h)), list(range(w)))
    pos = torch.tensor([[table_entry(i, j, c, D) for c in range(D)] for i in rows for j in cols])
    kv = layer_norm(x @ r.kv_proj.weight.T, r.ln_kv)  # (h*w, D)
    queries = layer_norm(r.query, r.ln_q)  # (Q, D)
    wq, wk, wv = r.attn.in_proj_weight.chunk(3)
    bq, bk, bv = r.attn.in_proj_bias.chunk(3)
    q, k, v = queries @ wq.T + bq, (kv + pos) @ wk.T + bk, kv @ wv.T + bv
    hd = D // HEADS
    heads = []
    for n in range(HEADS):
        s = slice(n * hd, (n + 1) * hd)
        weights = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(hd), dim=-1)  # (Q, h*w)
        heads.append(weights @ v[:, s])
    out = torch.cat(heads, dim=-1) @ r.attn.out_proj.weight.T + r.attn.out_proj.bias
    return layer_norm(out, r.ln_post) @ r.proj


def test_matches_explicit_reimplementation():
    r = make_resampler()
    for h, w in [(3, 4), (5, 1), (2, 7)]:
        x = features(h, w, seed=h * 10 + w)
        with torch.no_grad():
            got = r(x[None], torch.tensor([[h, w]], dtype=torch.int32))[0]
            expected = explicit_resampler(r, x, h, w)
        assert (got - expected).abs().max().item() <= 1e-5, (h, w)


def test_padded_batch_equals_each_view_alone():
    r = make_resampler()
    sizes = [[3, 4], [5, 1], [2, 7], [1, 1]]
    feats = [features(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        batched = r(pad_batch(feats), torch.tensor(sizes, dtype=torch.int32))
        assert batched.shape == (4, Q, D)
        for b, ((h, w), x) in enumerate(zip(sizes, feats)):
            alone = r(x[None], torch.tensor([[h, w]]))
            assert torch.allclose(batched[b], alone[0], atol=1e-5), b
        # Extra padding beyond the longest view changes nothing either.
        longer = r(F.pad(pad_batch(feats), (0, 0, 0, 5), value=3.0), torch.tensor(sizes))
    assert torch.allclose(batched, longer, atol=1e-5)


def test_adaptive_cache_grows_and_never_shrinks():
    r = make_resampler(max_size=(4, 4))
    assert r.pos_embed.shape == (4, 4, D) and "pos_embed" not in r.state_dict()
    with torch.no_grad():
        x = features(5, 7, seed=1)
        out = r(x[None], torch.tensor([[5, 7]]))[0]
        assert r.max_size == (5, 7) and r.pos_embed.shape == (5, 7, D)
        assert (out - explicit_resampler(r, x, 5, 7)).abs().max().item() <= 1e-5
        r(features(3, 9, seed=2)[None], torch.tensor([[3, 9]]))
        assert r.max_size == (5, 9) and r.pos_embed.shape == (5, 9, D)
        r(features(2, 2, seed=3)[None], torch.tensor([[2, 2]]))
        assert r.max_size == (5, 9) and r.pos_embed.shape == (5, 9, D)
    assert torch.equal(r.pos_embed, torch.from_numpy(sincos_2d(D, (5, 9))))


@pytest.mark.parametrize("sizes", [[[1, 1]], [[3, 17], [9, 2]], [[70, 70]]])
def test_output_shape_for_any_grid(sizes):
    r = make_resampler()
    length = max(h * w for h, w in sizes)
    with torch.no_grad():
        out = r(torch.randn(len(sizes), length, KV), torch.tensor(sizes))
    assert out.shape == (len(sizes), Q, D) and torch.isfinite(out).all()


def test_identity_kv_proj_when_widths_match():
    r = Resampler(Q, D, HEADS, kv_dim=D)
    assert isinstance(r.kv_proj, torch.nn.Identity) and "kv_proj.weight" not in r.state_dict()


def test_meta_build_has_reference_parameter_count_and_names():
    with torch.device("meta"):
        r = Resampler(64, 3584, 28, 1152)
    assert sum(p.numel() for p in r.parameters()) == 68_619_264
    shapes = {k: tuple(v.shape) for k, v in r.state_dict().items()}
    assert shapes == {
        "query": (64, 3584), "proj": (3584, 3584), "kv_proj.weight": (3584, 1152),
        "attn.in_proj_weight": (10752, 3584), "attn.in_proj_bias": (10752,),
        "attn.out_proj.weight": (3584, 3584), "attn.out_proj.bias": (3584,),
        "ln_q.weight": (3584,), "ln_q.bias": (3584,), "ln_kv.weight": (3584,), "ln_kv.bias": (3584,),
        "ln_post.weight": (3584,), "ln_post.bias": (3584,),
    }
    assert r.pos_embed.is_meta and r.pos_embed.shape == (70, 70, 3584)
    r.reset_buffers(device="cpu")  # what a loader calls after assigning the checkpoint's tensors
    assert r.pos_embed.device.type == "cpu" and torch.equal(r.pos_embed, torch.from_numpy(sincos_2d(3584, (70, 70))))


def test_materialised_from_meta_rebuilds_its_table():
    source = make_resampler()
    with torch.device("meta"):
        r = Resampler(Q, D, HEADS, KV)
    r.to_empty(device="cpu")  # pos_embed is now uninitialised memory and is not in the checkpoint
    r.load_state_dict(source.state_dict())
    x = pad_batch([features(3, 4, seed=5), features(2, 2, seed=6)])
    sizes = torch.tensor([[3, 4], [2, 2]])
    with torch.no_grad():
        assert torch.equal(r.eval()(x, sizes), source(x, sizes))
    assert torch.equal(r.pos_embed, source.pos_embed)


# ---- relative key positions (opt-in, not the reference's) ---------------------------------------------------------
def test_relative_positions_are_part_centres_on_the_grid():
    assert relative_positions(4, 8).tolist() == [0.5, 2.5, 4.5, 6.5]  # (r + 1/2) * 8/4 - 1/2
    assert relative_positions(16, 8).tolist() == [-0.25 + 0.5 * c for c in range(16)]
    assert relative_positions(8, 8).tolist() == list(range(8))  # a square view: the patch indices, exactly
    assert relative_positions(7, 8)[3] == pytest.approx(3.5)  # the middle patch of 7 at the middle of 8 cells


def test_relative_keys_match_hand_positions_and_leave_a_square_view_as_absolute():
    absolute = make_resampler()
    relative = make_resampler()
    relative.relative_grid = 8
    with torch.no_grad():
        square = features(8, 8, seed=5)
        same = relative(square[None], torch.tensor([[8, 8]]))[0]
        assert torch.equal(same, absolute(square[None], torch.tensor([[8, 8]]))[0])
        for h, w in [(4, 16), (7, 9), (1, 3)]:
            x = features(h, w, seed=h + w)
            got = relative(x[None], torch.tensor([[h, w]]))[0]
            rows = [(i + 0.5) * 8 / h - 0.5 for i in range(h)]
            cols = [(j + 0.5) * 8 / w - 0.5 for j in range(w)]
            assert (got - explicit_resampler(relative, x, h, w, at=(rows, cols))).abs().max().item() <= 1e-5
            # and not the absolute placement, which the reference keeps
            assert (got - absolute(x[None], torch.tensor([[h, w]]))[0]).abs().max().item() > 1e-3


def test_relative_padded_batch_equals_each_view_alone():
    r = make_resampler()
    r.relative_grid = 6
    sizes = [[4, 16], [8, 8], [3, 5]]
    feats = [features(h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        batched = r(pad_batch(feats), torch.tensor(sizes))
        for b, ((h, w), x) in enumerate(zip(sizes, feats)):
            assert torch.allclose(batched[b], r(x[None], torch.tensor([[h, w]]))[0], atol=1e-5), b
    assert r.max_size == (70, 70)  # the absolute table is neither used nor grown


def test_relative_grid_must_be_positive():
    with pytest.raises(ValueError, match="relative_grid must be a positive number of cells, got 0"):
        Resampler(Q, D, HEADS, KV, relative_grid=0)


# ---- layers over the resampled tokens (opt-in, not the reference's) -----------------------------------------------
def test_query_layers_run_between_the_attention_and_ln_post_one_view_at_a_time():
    torch.manual_seed(0)
    r = Resampler(Q, D, HEADS, KV, query_layers=2).eval()
    assert [n for n in r.state_dict() if n.startswith("query_layers.1.")][:2] == [
        "query_layers.1.self_attn.in_proj_weight", "query_layers.1.self_attn.in_proj_bias"]
    sizes = [[3, 4], [5, 1], [2, 7]]
    feats = [features(h, w, seed=20 + i) for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        batched = r(pad_batch(feats), torch.tensor(sizes))
        x, (h, w) = feats[0], sizes[0]
        kv = r.ln_kv(r.kv_proj(x))[:, None]  # (L, 1, D)
        pos = torch.from_numpy(sincos_2d(D, (h, w))).reshape(h * w, 1, D)
        attended = r.attn(r.ln_q(r.query)[:, None], kv + pos, kv)[0].transpose(0, 1)  # (1, Q, D)
        by_hand = r.ln_post(r.query_layers[1](r.query_layers[0](attended))) @ r.proj
        assert torch.allclose(batched[0], by_hand[0], atol=1e-5)
        without = r.ln_post(attended) @ r.proj
        assert (batched[0] - without[0]).abs().max().item() > 1e-3  # the layers change the tokens
        # a view's tokens see each other, never another view's: changing view 1 leaves views 0 and 2 as they were
        feats[1] = feats[1] + 1.0
        changed = r(pad_batch(feats), torch.tensor(sizes))
    assert torch.allclose(changed[0], batched[0], atol=1e-6) and torch.allclose(changed[2], batched[2], atol=1e-6)
    assert (changed[1] - batched[1]).abs().max().item() > 1e-3


def test_query_layers_let_a_token_see_what_only_another_token_attended():
    """Without the layers, token i is a function of the keys and query i alone; with them, of the other tokens too."""
    torch.manual_seed(1)
    for layers, moves in ((0, False), (1, True)):
        r = Resampler(Q, D, HEADS, KV, query_layers=layers).eval()
        with torch.no_grad():
            r.query[1:].add_(3.0 * torch.randn_like(r.query[1:]))  # token 0 unchanged, the others moved
            x = features(3, 3, seed=7)
            before = r(x[None], torch.tensor([[3, 3]]))[0, 0]
            r.query[1:].mul_(-1.0)
            after = r(x[None], torch.tensor([[3, 3]]))[0, 0]
        assert ((after - before).abs().max().item() > 1e-4) is moves, layers
