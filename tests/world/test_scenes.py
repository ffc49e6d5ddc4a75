"""The scene world: vocabulary, sampling, rendering (tight boxes), and the truth of every text about a scene."""

import dataclasses
import itertools
import random
import re

import numpy as np
import pytest

from mllm.world import scenes as S
from mllm.world.scenes import Scene, SceneObject


def rendered_scenes(n, seed=0, large_fraction=0.3):
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}/{i}")
        out.append(S.render_scene(S.sample_scene(rng, f"s{i}", large_fraction))[1])
    return out


@pytest.fixture(scope="module")
def many_scenes():
    return rendered_scenes(150)


# ---- vocabulary --------------------------------------------------------------------------------------------------

def test_vocabulary_is_unambiguous():
    assert len(S.CATEGORIES) >= 10 and len(S.COLOURS) >= 6
    names = [n for names in S.CATEGORIES.values() for n in names]
    assert len(names) == len(set(names)), "a name shared by two categories"
    for canonical, synonyms in S.CATEGORIES.items():
        assert synonyms[0] == canonical and 2 <= len(synonyms) <= 4
    other_words = set(S.COLOURS) | {"small", "medium", "sized", "large", "object", "objects", "image", "background"}
    other_words |= {w for phrase in list(S.CELL_PHRASES.values()) + list(S.QUALIFIERS) for w in phrase.split()}
    assert not other_words & set(names)
    for (a, rgb_a), (b, rgb_b) in itertools.combinations(S.COLOURS.items(), 2):
        assert np.linalg.norm(np.subtract(rgb_a, rgb_b)) > 80, (a, b)


def test_mentioned_categories_folds_plurals_and_synonyms():
    assert S.mentioned_categories("Two boxes, a Disc and three crosses; no pluses.") == \
        ["square", "circle", "cross", "cross"]
    assert S.plural("box") == "boxes" and S.plural("star") == "stars" and S.article("orange") == "an"


# ---- sampling and rendering --------------------------------------------------------------------------------------

def test_image_size_distribution():
    rng = random.Random(0)
    sizes = [S.sample_image_size(rng, 0.15) for _ in range(4000)]
    small = [s for s in sizes if s in S.SMALL_SIZES]
    assert 0.82 < len(small) / len(sizes) < 0.88
    assert all(w * h <= 112 * 112 for w, h in S.SMALL_SIZES)
    assert all(max(s) <= 480 for s in sizes)
    assert any(max(w, h) / min(w, h) >= 4 for w, h in sizes)
    assert all(s in S.SMALL_SIZES for s in (S.sample_image_size(rng, 0.0) for _ in range(200)))


def test_scenes_are_valid_and_in_raster_order(many_scenes):
    assert {len(s.objects) for s in many_scenes} == set(range(1, 7))
    for scene in many_scenes:
        short = min(scene.width, scene.height)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
            assert S.MIN_SIZE_FRAC * short - 0.01 <= obj.size <= S.MAX_SIZE_FRAC * short + 0.01
            assert max(x1 - x0, y1 - y0) >= 0.1 * short  # still visible as a shape
        for a, b in itertools.combinations(scene.objects, 2):
            assert a.bbox[2] <= b.bbox[0] or b.bbox[2] <= a.bbox[0] or a.bbox[3] <= b.bbox[1] or b.bbox[3] <= a.bbox[1]
        keys = [S.raster_key(o, scene.width, scene.height) for o in scene.objects]
        assert keys == sorted(keys)


def test_sampling_and_rendering_are_deterministic():
    def make():
        return S.render_scene(S.sample_scene(random.Random("x"), "a", 0.5))
    (image_a, scene_a), (image_b, scene_b) = make(), make()
    assert scene_a == scene_b and image_a.tobytes() == image_b.tobytes()


def test_background_is_light():
    image, scene = S.render_scene(S.sample_scene(random.Random(5), "a"))
    pixels = np.asarray(image).reshape(-1, 3)
    assert np.median(pixels, axis=0).min() >= 225


def test_bbox_is_the_tight_box_of_the_drawn_shape():
    for i in range(30):
        sampled = S.sample_scene(random.Random(f"tight/{i}"), "t", 0.2)
        # the last-sampled object is drawn last, so removing it leaves every other pixel unchanged
        with_all, drawn = S.render_scene(sampled)
        without, _ = S.render_scene(dataclasses.replace(sampled, objects=sampled.objects[:-1]))
        diff = np.abs(np.asarray(with_all, np.int32) - np.asarray(without, np.int32)).sum(axis=2)  # (H, W)
        ys, xs = np.nonzero(diff >= 0.35 * diff.max())
        target = next(o for o in drawn.objects if (o.cx, o.cy) == (sampled.objects[-1].cx, sampled.objects[-1].cy))
        found = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert np.abs(np.subtract(found, target.bbox)).max() <= 1, (i, found, target.bbox)


# ---- texts -------------------------------------------------------------------------------------------------------

def hand_scene():
    objects = (SceneObject("circle", "blue", 80.0, 22.0, 28.0, 0.0), SceneObject("star", "red", 25.0, 25.0, 28.0, 5.0),
               SceneObject("square", "orange", 56.0, 85.0, 40.0, 0.0))
    return S.render_scene(Scene("h", 112, 112, objects, style_seed=1))[1]


def test_descriptions_list_objects_in_raster_order():
    scene = hand_scene()
    mentions = S.scene_mentions(scene, random.Random(0))
    assert S.short_description(mentions) == "a red star, a blue circle and an orange square."
    assert S.short_description(mentions[:1]) == "a red star."
    assert S.detailed_description(mentions) == (
        "The image shows three objects on a light background. A medium-sized red star is in the top left. "
        "A medium-sized blue circle is in the top right. A large orange square is at the bottom.")
    assert S.detailed_description(mentions[:1], variant=1) == \
        "The image shows one object on a light background. In the top left there is a medium-sized red star."


def test_noised_and_rejected_texts_name_one_absent_object(many_scenes):
    kinds = set()
    for k, scene in enumerate(many_scenes):
        rng = random.Random(k)
        present = {o.category for o in scene.objects}
        mentions = S.scene_mentions(scene, rng, 0.5)
        noised = S.with_extra_mention(mentions, S.absent_mention(scene, rng, mentions), rng)
        for text in (S.short_description(noised), S.detailed_description(noised)):
            named = S.mentioned_categories(text)
            assert len(named) == len(scene.objects) + 1 and len(set(named) - present) == 1
        chosen = S.detailed_description(mentions)
        rejected_mentions, kind = S.preference_rejected(scene, mentions, rng)
        rejected = S.detailed_description(rejected_mentions)
        kinds.add(kind)
        assert rejected != chosen and len(rejected) < 1.7 * len(chosen)
        absent_named = set(S.mentioned_categories(rejected)) - present
        assert len(absent_named) == (0 if kind == "wrong_colour" else 1)
    assert kinds == {"hallucinated_object", "wrong_shape", "wrong_colour"}


def yesno_truth(scene, question):
    """An independent oracle for the four question forms."""
    counts = {c: sum(o.category == c for o in scene.objects) for c in S.CATEGORIES}
    words = {w: i for i, w in enumerate(S.NUMBER_WORDS)}
    if m := re.fullmatch(r"Is the (\w+) (\w+) (.+) of the image\?", question):
        cells = [S.grid_cell(o, scene.width, scene.height) for o in scene.objects
                 if (o.colour, o.category) == m.group(1, 2)]
        assert len(cells) == 1
        return S.CELL_PHRASES[cells[0]] == m.group(3)
    if m := re.fullmatch(r"(?:Is|Are) there exactly (\w+) (\w+) in the image\?", question):
        return counts[S.mentioned_categories(m.group(2))[0]] == words[m.group(1)]
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", question):
        return any((o.colour, o.category) == m.group(1, 2) for o in scene.objects)
    m = re.fullmatch(r"Is there an? (\w+) in the image\?", question)
    return counts[m.group(1)] > 0


def test_yesno_pairs_are_true_and_balanced(many_scenes):
    kinds = set()
    for k, scene in enumerate(many_scenes):
        kind, pair = S.yesno_pair(scene, random.Random(k))
        kinds.add(kind)
        assert sorted(a for _, a in pair) == ["No", "Yes"]
        for question, answer in pair:
            assert question.endswith(S.YESNO_SUFFIX)
            assert yesno_truth(scene, question[:-len(S.YESNO_SUFFIX)]) == (answer == "Yes"), question
    assert kinds == {"existence", "color", "count", "position"}


def test_counting_and_dialogue_answers_are_true(many_scenes):
    for k, scene in enumerate(many_scenes):
        rng = random.Random(k)
        question, answer = S.counting_qa(scene, rng)
        category = S.mentioned_categories(question)[0]
        assert answer == str(sum(o.category == category for o in scene.objects))
        turns = S.dialogue(scene, rng)
        assert 2 <= len(turns) <= 3
        for question, answer in turns:
            if question == "How many objects are there?":
                assert answer == str(len(scene.objects))
            elif m := re.fullmatch(r"What colour is the (\w+)\?", question):
                assert [o.colour for o in scene.objects if o.category == m.group(1)] == [answer]


def test_referring_expressions_pick_out_exactly_their_object(many_scenes):
    n_expressions = n_objects = 0
    for k, scene in enumerate(many_scenes):
        rng = random.Random(k)
        for i in range(len(scene.objects)):
            n_objects += 1
            expression = S.referring_expression(scene, i, rng)
            if expression is not None:
                n_expressions += 1
                assert S.objects_matching(scene, *S.parse_referring_expression(expression)) == [i], expression
    assert n_expressions > 0.95 * n_objects


def test_referring_expression_adds_position_only_when_needed():
    objects = (SceneObject("star", "red", 20.0, 56.0, 24.0, 0.0), SceneObject("star", "red", 92.0, 56.0, 24.0, 0.0),
               SceneObject("star", "blue", 56.0, 20.0, 24.0, 0.0))
    scene = S.render_scene(Scene("r", 112, 112, objects, style_seed=0))[1]
    rng = random.Random(0)
    expressions = [S.referring_expression(dataclasses.replace(scene), i, rng) for i in range(3)]
    assert expressions[0] == "the blue star" or expressions[0] == "the blue starburst"
    assert expressions[1].endswith("on the left") and expressions[2].endswith("on the right")
    same_cell = (SceneObject("ring", "red", 15.0, 15.0, 18.0, 0.0), SceneObject("ring", "red", 15.0, 60.0, 18.0, 0.0))
    scene = S.render_scene(Scene("r", 112, 448, same_cell, style_seed=0))[1]  # both in the top-left cell
    assert S.referring_expression(scene, 0, rng) is None
    with pytest.raises(ValueError):
        S.parse_referring_expression("the red star somewhere")


def test_drawn_scene_gives_the_boxes_and_order_of_the_rendered_one():
    for i in range(20):
        scene = S.sample_scene(random.Random(f"drawn/{i}"), f"d{i}", 0.3)
        assert S.drawn_scene(scene) == S.render_scene(scene)[1]
