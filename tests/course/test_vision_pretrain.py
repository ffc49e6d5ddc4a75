"""Targets of the vision pretraining phase, hand-worked, and a smoke run that must raise patch accuracy."""

import torch

from mllm.course.base import (COLOUR_NAMES, GRID, N_SCENE_TARGETS, SHAPES, centre_targets, patch_targets,
                              scene_targets)

SCENE = {"width": 112, "height": 56, "objects": [
    {"category": "star", "colour": "red", "cx": 20.0, "cy": 20.0, "bbox": [0, 0, 40, 40]},
    {"category": "moon", "colour": "blue", "cx": 35.0, "cy": 30.0, "bbox": [29, 20, 41, 40]},
]}


def test_patch_targets_by_patch_centre_last_drawn_wins():
    # a 2 x 4 view: patch centres at x = 14, 42, 70, 98 and y = 14, 42
    shape, colour = patch_targets(SCENE, rows=2, cols=4)
    star, moon = SHAPES.index("star") + 1, SHAPES.index("moon") + 1
    red, blue = COLOUR_NAMES.index("red") + 1, COLOUR_NAMES.index("blue") + 1
    # (14, 14) in the star only; (42, 14): x=42 outside both boxes; (14, 42): y=42 outside both
    assert shape.tolist() == [star, 0, 0, 0, 0, 0, 0, 0]
    assert colour.tolist() == [red, 0, 0, 0, 0, 0, 0, 0]
    shape, colour = patch_targets(SCENE, rows=4, cols=8)  # centres x = 7, 21, 35, ...; y = 7, 21, 35, 49
    # (35, 21) and (35, 35) lie in both boxes: the moon, drawn later, wins
    assert shape[1 * 8 + 2].item() == moon and colour[1 * 8 + 2].item() == blue
    assert shape[2 * 8 + 2].item() == moon and shape[2 * 8 + 1].item() == star and shape[0].item() == star
    assert shape[3 * 8 + 0].item() == 0  # y = 49 is below both boxes


def test_centre_targets_name_the_slot_cell_of_the_patchs_object_last_drawn_wins():
    # a 4 x 8 view as above; slot cells of a 6 x 6 grid on 112 x 56: the star's centre (20, 20) is column
    # int(6*20/112) = 1, row int(6*20/56) = 2 -> cell 13; the moon's (35, 30): column 1, row 3 -> cell 19
    centre = centre_targets(SCENE, rows=4, cols=8)
    assert centre[0].item() == 1 + 13 and centre[2 * 8 + 1].item() == 1 + 13  # star patches
    assert centre[1 * 8 + 2].item() == 1 + 19 and centre[2 * 8 + 2].item() == 1 + 19  # in both boxes: the moon
    assert centre[3 * 8 + 0].item() == 0 and centre[0 * 8 + 5].item() == 0  # background
    assert set(centre.tolist()) == {0, 14, 20}
    # every patch the shape target gives an object names a cell, and only those
    shape, _ = patch_targets(SCENE, rows=4, cols=8)
    assert torch.equal(centre > 0, shape > 0)


def test_scene_targets_cells_and_pairs():
    t = scene_targets(SCENE)
    assert t.shape == (N_SCENE_TARGETS,) and t.sum().item() == 2 * 2 + 2
    per_cell = len(SHAPES) + len(COLOUR_NAMES)
    cells = t[: GRID * GRID * per_cell].view(GRID, GRID, per_cell)
    # star centre (20, 20): column int(20*3/112)=0, row int(20*3/56)=1; moon (35, 30): column 0, row 1
    assert cells[1, 0, SHAPES.index("star")] == 1 and cells[1, 0, SHAPES.index("moon")] == 1
    assert cells[1, 0, len(SHAPES) + COLOUR_NAMES.index("red")] == 1
    assert cells.sum() == 4 and cells[1, 0].sum() == 4
    pairs = t[GRID * GRID * per_cell:].view(len(SHAPES), len(COLOUR_NAMES))
    assert pairs[SHAPES.index("star"), COLOUR_NAMES.index("red")] == 1
    assert pairs[SHAPES.index("moon"), COLOUR_NAMES.index("blue")] == 1 and pairs.sum() == 2


def test_pretraining_fits_a_few_scenes_and_touches_only_vision_and_resampler(tmp_path, tiny_checkpoint):
    from mllm.course.base import pretrain
    from mllm.model.loading import load_pretrained
    from mllm.world.synth import generate

    generate(tmp_path, n_train=8, n_test=0, seed=3, progress=False)
    model, _, _ = load_pretrained(tiny_checkpoint)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    log = pretrain(model, tmp_path, steps=60, batch_size=8, lr=3e-3, log_every=10)
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    assert log[-1]["patch_colour_acc"] > 0.6  # colour is learnt first; eight scenes are memorised
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == name.startswith(("vpm.", "resampler.")), name
    assert "patch_centre_acc" not in log[-1]


def test_pretraining_with_the_centre_head_learns_the_cells(tmp_path, tiny_checkpoint):
    """The centre head's accuracy on object patches rises on a few memorised scenes (chance: 1 in 37); without the
    head the other heads start from the very same weights (the head is made last)."""
    from mllm.course.base import PretrainHeads, pretrain
    from mllm.model.loading import load_pretrained
    from mllm.world.synth import generate

    torch.manual_seed(0)
    plain = PretrainHeads(16, 4, 8)
    torch.manual_seed(0)
    with_centre = PretrainHeads(16, 4, 8, centre=True)
    assert torch.equal(plain.scene.weight, with_centre.scene.weight) and not hasattr(plain, "patch_centre")
    generate(tmp_path, n_train=8, n_test=0, seed=3, progress=False)
    model, _, _ = load_pretrained(tiny_checkpoint)
    log = pretrain(model, tmp_path, steps=80, batch_size=8, lr=3e-3, log_every=10, centre_weight=1.0)
    assert log[-1]["patch_centre_acc"] > max(0.3, 2 * log[0]["patch_centre_acc"])
