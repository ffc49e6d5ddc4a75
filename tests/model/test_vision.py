"""SigLIP NaViT vision tower: parity with HF Idefics2, batching with padding, position bucketing, options."""

import pytest
import torch
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

from mllm.model.configuration import VisionConfig
from mllm.model.vision import SiglipVisionTransformer, bucket_coords, pack_patch_strips, vision_position_ids

PATCH = 14
# image_size 224 -> a 16 x 16 position grid, so views smaller than 16 patches per side really get bucketed.
SIZES = dict(hidden_size=64, image_size=224, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
             patch_size=PATCH)


def make_model(**kwargs) -> SiglipVisionTransformer:
    torch.manual_seed(0)
    return SiglipVisionTransformer(VisionConfig(**SIZES), **kwargs).eval()


def to_strip(view: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """[C, h*p, w*p] -> [C, p, h*w*p]: the patches side by side in row-major order (facts §6.5)."""
    c, height, width = view.shape
    h, w = height // patch, width // patch
    grid = view.reshape(c, h, patch, w, patch)  # (C, h, p_row, w, p_col)
    return grid.permute(0, 2, 1, 3, 4).reshape(c, patch, h * w * patch)  # (C, p_row, h*w*p_col)


def random_view(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(3, h * PATCH, w * PATCH, generator=torch.Generator().manual_seed(seed))


def run_views(model, views, sizes) -> torch.Tensor:
    pixel_values, mask = pack_patch_strips([to_strip(v) for v in views])
    return model(pixel_values, mask, torch.tensor(sizes, dtype=torch.int32))


def test_pack_patch_strips_pads_along_patch_axis():
    strips = [torch.randn(3, PATCH, 4 * PATCH), torch.randn(3, PATCH, 2 * PATCH)]
    packed, mask = pack_patch_strips(strips)
    assert packed.shape == (2, 3, PATCH, 4 * PATCH) and mask.shape == (2, 1, 4) and mask.dtype == torch.bool
    assert torch.equal(packed[0], strips[0])
    assert torch.equal(packed[1, :, :, : 2 * PATCH], strips[1])
    assert torch.all(packed[1, :, :, 2 * PATCH:] == 0)
    assert mask.tolist() == [[[True] * 4], [[True, True, False, False]]]


@pytest.mark.parametrize("h, w", [(4, 6), (7, 3), (10, 10), (16, 16)])
def test_matches_hf_idefics2_on_single_views(h, w):
    ours = make_model()
    hf = Idefics2VisionTransformer(Idefics2VisionConfig(**SIZES)).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)  # same names, same shapes
    view = random_view(h, w, seed=h * 100 + w)
    with torch.no_grad():
        # HF sees an ordinary image and a full 2-D patch mask; we see a strip plus tgt_sizes.
        expected = hf(view[None], patch_attention_mask=torch.ones(1, h, w, dtype=torch.bool)).last_hidden_state
        got = run_views(ours, [view], [[h, w]])
    assert got.shape == (1, h * w, SIZES["hidden_size"])
    assert (got - expected).abs().max().item() <= 1e-4


def test_padded_batch_equals_each_view_alone():
    model = make_model()
    sizes = [[4, 6], [7, 3], [2, 5]]
    views = [random_view(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        batched = run_views(model, views, sizes)
        assert batched.shape == (3, 24, SIZES["hidden_size"])
        for b, (view, (h, w)) in enumerate(zip(views, sizes)):
            alone = run_views(model, [view], [[h, w]])
            assert torch.allclose(batched[b, : h * w], alone[0], atol=1e-5), b


def reference_buckets(n: int, grid: int) -> torch.Tensor:
    # Independent spelling of the reference ops: an int32 tgt size makes `1 / n` a float32 step.
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid)
    fractional = torch.arange(0, 1 - 1e-6, 1 / torch.tensor([n], dtype=torch.int32)[0])
    return torch.bucketize(fractional, boundaries, right=True)


# Indices i where the float32 arange/bucketize result is floor(70*i/h) - 1 (70*i/h is an integer there).
KNOWN_OFF_BY_ONE = {25: [5, 10, 15, 20], 49: [7, 14, 35, 42], 50: [5, 10, 15, 20, 30, 40], 55: [11, 22, 33, 44]}


@pytest.mark.parametrize("h", sorted(KNOWN_OFF_BY_ONE))
def test_position_bucketing_on_tricky_sizes(h):
    got = bucket_coords(torch.tensor(h, dtype=torch.int32), 70)
    assert torch.equal(got, reference_buckets(h, 70))
    floor = torch.tensor([70 * i // h for i in range(h)])
    exact = torch.tensor([(70 * i) % h != 0 for i in range(h)])
    assert torch.equal(got[exact], floor[exact])  # away from integer points the closed form holds
    off = (got != floor).nonzero().flatten().tolist()
    assert off == KNOWN_OFF_BY_ONE[h] and torch.all(got[off] == floor[off] - 1)


def test_position_ids_come_from_tgt_sizes_not_mask():
    tgt_sizes = torch.tensor([[25, 3], [2, 55]], dtype=torch.int32)
    mask = torch.zeros(2, 1, 110, dtype=torch.bool)
    mask[0, 0, :75] = True
    mask[1, 0, :110] = True
    ids = vision_position_ids(mask, tgt_sizes, 70)
    rows, cols = reference_buckets(25, 70), reference_buckets(3, 70)
    assert torch.equal(ids[0, :75], (rows[:, None] * 70 + cols[None, :]).flatten())
    assert torch.all(ids[0, 75:] == 0)
    rows, cols = reference_buckets(2, 70), reference_buckets(55, 70)
    assert torch.equal(ids[1], (rows[:, None] * 70 + cols[None, :]).flatten())
    with pytest.raises(ValueError, match="disagree"):
        vision_position_ids(mask, torch.tensor([[5, 5], [2, 55]], dtype=torch.int32), 70)


def test_num_layers_drops_the_last_layer():
    full = make_model()
    short = SiglipVisionTransformer(VisionConfig(**SIZES), num_layers=1).eval()
    assert len(short.encoder.layers) == 1
    state = {k: v for k, v in full.state_dict().items() if not k.startswith("encoder.layers.1.")}
    short.load_state_dict(state, strict=True)
    view = random_view(5, 4, seed=7)
    with torch.no_grad():
        out_short = run_views(short, [view], [[5, 4]])
        out_full = run_views(full, [view], [[5, 4]])
        del full.encoder.layers[1]  # the same tower with its last layer cut by hand
        out_cut = run_views(full, [view], [[5, 4]])
    assert not torch.allclose(out_short, out_full, atol=1e-3)
    assert torch.allclose(out_short, out_cut, atol=1e-6)


def test_sdpa_and_eager_agree():
    model = make_model()
    assert model.attn_implementation == "sdpa"
    sizes = [[4, 6], [3, 3]]
    views = [random_view(h, w, seed=20 + i) for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        sdpa = run_views(model, views, sizes)
        model.attn_implementation = "eager"
        assert all(layer.self_attn.attn_implementation == "eager" for layer in model.encoder.layers)
        eager = run_views(model, views, sizes)
    assert torch.allclose(sdpa[0], eager[0], atol=1e-5)
    assert torch.allclose(sdpa[1, :9], eager[1, :9], atol=1e-5)


def test_gradient_checkpointing_gives_equal_grads():
    sizes = [[4, 6], [3, 3]]
    views = [random_view(h, w, seed=30 + i) for i, (h, w) in enumerate(sizes)]
    grads = []
    for use_checkpointing in (False, True):
        model = make_model().train()
        model.gradient_checkpointing = use_checkpointing
        assert model.encoder.gradient_checkpointing is use_checkpointing
        out = run_views(model, views, sizes)
        (out[0].square().mean() + out[1, :9].square().mean()).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
