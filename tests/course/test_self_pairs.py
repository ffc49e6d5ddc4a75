"""Preference pairs from a model's own descriptions: the rule-based correction, the ranking, and the whole
sample -> score -> pair run on a tiny world (resumable, files written)."""

import json
import math

import pytest

from mllm.cli.preference_pairs import main
from mllm.course.self_pairs import build_pairs, correct_description, rank_pairs, sample_questions

CAPTION = ("The image shows three objects on a light background. A small red star is in the top left. "
           "A large blue heart is in the center. A small green circle is at the bottom.")


def test_correction_drops_hallucinating_sentences_and_recounts():
    chosen = correct_description(CAPTION, lambda s: "heart" in s)
    assert chosen == ("The image shows two objects on a light background. A small red star is in the top left. "
                      "A small green circle is at the bottom.")
    one = correct_description(CAPTION, lambda s: "heart" in s or "circle" in s)
    assert one.startswith("The image shows one object on a light background.") and one.endswith("top left.")


def test_correction_gives_none_when_nothing_or_everything_goes():
    assert correct_description(CAPTION, lambda s: False) is None
    assert correct_description(CAPTION, lambda s: "small" in s or "large" in s) is None  # only the count is left
    assert correct_description("In the center there is a red star.", lambda s: "star" in s) is None


def test_corrected_pairs_judge_sentences_by_the_ground_truth(tmp_path):
    from mllm.course.self_pairs import corrected_pairs
    from mllm.eval import chair

    (tmp_path / "gt.json").write_text(json.dumps({
        "vocabulary": {"star": ["star", "starburst"], "heart": ["heart"], "circle": ["circle", "disc"]},
        "double_words": {}, "images": {"a": ["star", "circle"], "b": ["star"]}}))
    vocab, gt = chair.load_chair_gt(tmp_path / "gt.json")
    rows = [_row("a", CAPTION, 0), _row("b", "The image shows one object on a light background. "
                                          "A small red starburst is in the top left.", 1)]
    scored = chair.score([{"image_id": r["metainfos"]["image_id"], "caption": r["answer"]} for r in rows], gt, vocab)
    pairs = corrected_pairs(rows, scored["sentences"], vocab, gt)
    assert len(pairs) == 1  # "b" names only what it shows
    assert pairs[0]["rejected"] == CAPTION and "heart" not in pairs[0]["chosen"]
    assert pairs[0]["chosen"].startswith("The image shows two objects") and pairs[0]["image_path"] == "images/a.png"
    assert pairs[0]["metainfos"]["rejected_hallucinated"] == 1

    balanced = corrected_pairs(rows, scored["sentences"], vocab, gt, true_drops=1)
    assert balanced[0] == pairs[0]
    # the corrected caption keeps two true sentences (star, circle); the added pair drops one of them
    assert balanced[1]["chosen"] == pairs[0]["chosen"] and balanced[1]["metainfos"]["source"] == "dropped_true"
    assert balanced[1]["rejected"] in (
        "The image shows one object on a light background. A small red star is in the top left.",
        "The image shows one object on a light background. A small green circle is at the bottom.")
    assert len(balanced) == 2 and [p["idx"] for p in balanced] == [0, 1]


def test_dropping_true_sentences_picks_different_ones_and_needs_two():
    import random

    from mllm.course.self_pairs import drop_true_sentences

    names = lambda s: any(w in s for w in ("star", "heart", "circle"))  # noqa: E731
    three = drop_true_sentences(CAPTION, names, random.Random(0), k=5)
    assert len(three) == 3 and len(set(three)) == 3  # at most one per object sentence, each a different one
    assert all(s.startswith("The image shows two objects") and s.count(". ") == 2 for s in three)
    seen = {drop_true_sentences(CAPTION, names, random.Random(seed))[0] for seed in range(20)}
    assert seen == set(three)
    two = "The image shows one object on a light background. A small red star is in the top left."
    assert drop_true_sentences(two, names, random.Random(0), k=2) == []

def _row(image_id, text, i):
    return {"idx": i, "question": "Describe.", "answer": text,
            "metainfos": {"image_id": image_id, "image_path": f"images/{image_id}.png"}}


def _sentence(image_id, hallucinated, recall):
    return {"image_id": image_id, "mscoco_hallucinated_words": [["x", "x"]] * hallucinated,
            "metrics": {"Recall": recall}}


def test_ranking_picks_fewest_against_most_hallucinations_with_recall_as_tie_break():
    rows = [_row("a", "a0", 0), _row("a", "a1", 1), _row("a", "a2", 2), _row("a", "a3", 3),
            _row("b", "b0", 4), _row("b", "b1", 5),
            _row("c", "c0", 6), _row("c", "c1", 7)]
    scores = [_sentence("a", 1, 0.5), _sentence("a", 0, 0.5), _sentence("a", 0, 1.0), _sentence("a", 2, 0.5),
              _sentence("b", 1, 0.2), _sentence("b", 1, 0.9),  # equal hallucinations: no pair
              _sentence("c", 1, 0.9), _sentence("c", 1, 0.9)]
    pairs = rank_pairs(rows, scores)
    assert len(pairs) == 1
    assert pairs[0]["chosen"] == "a2" and pairs[0]["rejected"] == "a3"  # recall breaks the tie among zeros
    assert pairs[0]["image_path"] == "images/a.png" and pairs[0]["metainfos"]["rejected_hallucinated"] == 2
    with pytest.raises(ValueError, match="out of order"):
        rank_pairs(rows[:2], [scores[1], scores[4]])


def test_questions_repeat_one_prompt_per_image():
    scenes = [{"split": "test", "image": "t.png", "image_id": "t"}] + \
             [{"split": "train", "image": f"{i}.png", "image_id": str(i)} for i in range(3)]
    questions = sample_questions(scenes, n_images=2, samples_per_image=3)
    assert [q["image_id"] for q in questions] == ["0"] * 3 + ["1"] * 3
    assert len({q["question"] for q in questions[:3]}) == 1
    with pytest.raises(ValueError, match="at least 2"):
        sample_questions(scenes, 2, 1)


def test_build_pairs_on_a_tiny_world_writes_and_resumes(tiny_checkpoint, tmp_path, monkeypatch):
    from mllm.world.synth import generate

    world = tmp_path / "world"
    generate(world, n_train=4, n_test=1, seed=0, progress=False)
    out = tmp_path / "pairs"
    summary = build_pairs(tiny_checkpoint, world, out, n_images=3, samples_per_image=2, max_new_tokens=6)
    assert summary["images"] == 3 and summary["samples"] == 6 and summary["mode"] == "balanced"
    pairs = json.loads((out / "pairs.json").read_text())
    assert len(pairs) == summary["pairs"] and [p["idx"] for p in pairs] == list(range(len(pairs)))
    samples = (out / "samples.jsonl").read_bytes()
    # A second run finds every sample done and does not sample again.
    monkeypatch.setattr("mllm.model.loading.load_pretrained", lambda *a, **k: pytest.fail("sampled again"))
    assert main(["--model", str(tiny_checkpoint), "--world", str(world), "--out", str(out), "--images", "3",
                 "--samples", "2", "--max-new-tokens", "6", "--mode", "ranked"]) == 0
    assert (out / "samples.jsonl").read_bytes() == samples
    assert json.loads((out / "pairs_summary.json").read_text())["mode"] == "ranked"


# 90 x 90: two small red stars (top left, bottom right) and a medium-sized blue heart in the centre, raster order
SCENE = {"image_id": "s", "width": 90, "height": 90, "style_seed": 0, "objects": [
    {"category": "star", "colour": "red", "cx": 15, "cy": 15, "size": 15, "rotation": 0, "bbox": [8, 8, 22, 22]},
    {"category": "heart", "colour": "blue", "cx": 45, "cy": 45, "size": 25, "rotation": 0, "bbox": [33, 33, 57, 57]},
    {"category": "star", "colour": "red", "cx": 75, "cy": 75, "size": 15, "rotation": 0, "bbox": [68, 68, 82, 82]}]}
COUNT = "The image shows three objects on a light background."
STAR_1, HEART, STAR_2 = ("A small red star is in the top left.", "A medium-sized blue heart is in the center.",
                         "A small red star is in the bottom right.")


def test_continuation_keeps_the_caption_to_its_first_error_then_names_the_rest():
    from mllm.course.self_pairs import continue_correctly

    assert continue_correctly(" ".join([COUNT, STAR_1, HEART, STAR_2]), SCENE) is None  # nothing wrong
    # the second red star is the scene's own, the third is one too many: the heart follows the two kept
    repeated = " ".join([COUNT, STAR_1, STAR_2, "A small red star is in the bottom right."])
    assert continue_correctly(repeated, SCENE) == " ".join([COUNT, STAR_1, STAR_2, HEART])
    # a true object at a wrong place, or of a wrong size, is an error too
    for wrong in ("A small red star is in the center.", "A large red star is in the bottom right."):
        assert continue_correctly(" ".join([COUNT, STAR_1, wrong]), SCENE) == " ".join([COUNT, STAR_1, HEART, STAR_2])
    # a hallucinated object, then true ones: everything after the error is rewritten in raster order
    hallucinated = " ".join([COUNT, STAR_1, "A small green moon is at the top.", HEART])
    assert continue_correctly(hallucinated, SCENE) == " ".join([COUNT, STAR_1, HEART, STAR_2])
    # stopping early is an error too; the caption's other wording is kept
    early = " ".join([COUNT, "In the top left there is a small red star."])
    assert continue_correctly(early, SCENE) == " ".join([early, "In the center there is a medium-sized blue heart.",
                                                         "In the bottom right there is a small red star."])
    # a wrong count: the world's whole description
    assert continue_correctly(" ".join(["The image shows two objects on a light background.", STAR_1]), SCENE) == \
        " ".join([COUNT, STAR_1, HEART, STAR_2])
    # a synonym names its category
    assert continue_correctly(" ".join([COUNT, "A small red starburst is in the top left.", HEART, STAR_2]),
                              SCENE) is None


def test_continuation_pairs_and_yesno_anchors():
    from mllm.course.self_pairs import continuation_pairs, yesno_anchor_pairs

    rows = [_row("s", " ".join([COUNT, STAR_1, STAR_1, STAR_1]), 0),
            _row("s", " ".join([COUNT, STAR_1, HEART, STAR_2]), 1)]
    pairs = continuation_pairs(rows, {"s": SCENE})
    assert len(pairs) == 1 and pairs[0]["rejected"] == rows[0]["answer"]
    # the second "red star in the top left" is one too many there: the rest follows the first
    assert pairs[0]["chosen"] == " ".join([COUNT, STAR_1, HEART, STAR_2]) and pairs[0]["image_path"] == "images/s.png"
    items = [{"id": f"q{i}", "image": "images/s.png", "conversations": [
        {"role": "user", "content": "<image>\nIs there a red star in the image? Please answer yes or no."},
        {"role": "assistant", "content": answer}]} for i, answer in enumerate(["Yes", "No", "Yes"])]
    anchors = yesno_anchor_pairs(items, 2, seed=0)
    assert len(anchors) == 2 and len({a["metainfos"]["image_id"] for a in anchors}) == 2
    for anchor in anchors:
        assert anchor["question"] == "Is there a red star in the image? Please answer yes or no."
        assert {anchor["chosen"], anchor["rejected"]} == {"Yes", "No"}
        truth = items[int(anchor["metainfos"]["image_id"][1:])]["conversations"][1]["content"]
        assert anchor["chosen"] == truth


def test_count_anchors_ask_true_and_wrong_counts_mostly_of_a_category_held_more_than_once():
    import re

    from mllm.course.self_pairs import count_anchor_pairs

    lone = {"image_id": "t", "objects": [SCENE["objects"][1]]}
    scenes = [SCENE | {"split": "train", "image": "images/s.png"}, lone | {"split": "train", "image": "images/t.png"},
              SCENE | {"image_id": "u", "split": "test", "image": "images/u.png"}]
    words = {"one": 1, "two": 2, "three": 3, "four": 4}
    pairs = count_anchor_pairs(scenes, 400, seed=0, several=1.0)
    assert len(pairs) == 400 and [p["idx"] for p in pairs] == list(range(400))
    asked = {"s": [], "t": []}
    for pair in pairs:
        match = re.fullmatch(r"(?:Is there exactly (one) (\w+)|Are there exactly (\w+) (\w+)s) in the image\? "
                             r"Please answer yes or no\.", pair["question"])
        assert match, pair["question"]
        number, category = (match[1], match[2]) if match[1] else (match[3], match[4])
        image = pair["metainfos"]["image_id"]
        held = {"s": {"star": 2, "heart": 1}, "t": {"heart": 1}}[image][category]
        assert pair["image_path"] == f"images/{image}.png" and pair["metainfos"]["held"] == held
        assert pair["chosen"] == ("Yes" if words[number] == held else "No") and pair["rejected"] != pair["chosen"]
        asked[image].append((category, words[number]))
    # the test scene is never asked; the two-star scene only about its stars (several=1.0), the lone heart about it
    assert {c for c, _ in asked["s"]} == {"star"} and {c for c, _ in asked["t"]} == {"heart"}
    # its wrong counts are one and three, the lone heart's two; about half the answers are Yes
    assert {k for _, k in asked["s"]} == {1, 2, 3} and {k for _, k in asked["t"]} == {1, 2}
    assert 0.4 < sum(p["chosen"] == "Yes" for p in pairs) / 400 < 0.6
    # several=0: any held category, the heart as often as the star
    hearts = sum("heart" in p["question"] for p in count_anchor_pairs(scenes[:1], 400, seed=1, several=0.0))
    assert 150 < hearts < 250
    assert count_anchor_pairs([lone | {"split": "test", "image": "x"}], 5) == []


def test_cut_pairs_end_the_rejected_side_at_its_first_wrong_word():
    from mllm.course.self_pairs import continuation_pairs, cut_at_error

    # a repeat: the texts part at the third sentence's size word ("medium-sized" blue heart against "small" red star)
    repeated = " ".join([COUNT, STAR_1, STAR_1, HEART])
    chosen = " ".join([COUNT, STAR_1, HEART, STAR_2])
    assert cut_at_error(chosen, repeated) == (" ".join([COUNT, STAR_1, "A small"]), True)
    # stopping early: the rejected side ends where the chosen one goes on, and its end is the error
    early = " ".join([COUNT, STAR_1])
    assert cut_at_error(chosen, early) == (early, False)
    # the last word is the first wrong one: nothing is cut off
    assert cut_at_error("a b c", "a b d") == ("a b d", False)
    rows = [_row("s", repeated, 0), _row("s", early, 1), _row("s", chosen, 2)]
    pairs = continuation_pairs(rows, {"s": SCENE}, cut=True)
    assert [p["rejected"] for p in pairs] == [" ".join([COUNT, STAR_1, "A small"]), early]
    assert [p.get("rejected_open") for p in pairs] == [True, None] and all(p["chosen"] == chosen for p in pairs)
    assert [p["rejected"] for p in continuation_pairs(rows, {"s": SCENE})] == [repeated, early]


def test_shape_correction_renames_the_misnamed_shape_of_the_object_at_that_colour_and_place():
    from mllm.course.self_pairs import correct_shapes, shape_pairs

    assert correct_shapes(" ".join([COUNT, STAR_1, HEART, STAR_2]), SCENE) is None  # every shape right
    # the blue object in the centre is the heart: "circle" (absent from the scene) is its misnamed shape
    circle = " ".join([COUNT, STAR_1, "A medium-sized blue circle is in the center.", STAR_2])
    assert correct_shapes(circle, SCENE) == (" ".join([COUNT, STAR_1, HEART, STAR_2]),
                                             " ".join([COUNT, STAR_1, "A medium-sized blue circle"]), True)
    # a shape the scene has (a star for the heart) is misnamed too, but no hallucination; the other wording, and two
    # errors: both renamed on the chosen side, the rejected side cut at the first
    other = " ".join([COUNT, "In the top left there is a small red heart.", "In the center there is a medium-sized "
                      "blue star.", "In the bottom right there is a small red star."])
    assert correct_shapes(other, SCENE) == (
        " ".join([COUNT, "In the top left there is a small red star.", "In the center there is a medium-sized blue "
                  "heart.", "In the bottom right there is a small red star."]),
        " ".join([COUNT, "In the top left there is a small red heart."]), False)
    # a colour or place no object has, or a wrong colour, is not a shape error: nothing to rename
    for wrong in ("A small green moon is at the top.", "A small blue star is in the top left."):
        assert correct_shapes(" ".join([COUNT, STAR_1, wrong]), SCENE) is None
    rows = [_row("s", circle, 0), _row("s", circle, 1), _row("s", other, 2), _row("s", " ".join([COUNT, STAR_1]), 3)]
    pairs = shape_pairs(rows, {"s": SCENE})  # the repeated sample gives one pair; the short right one none
    assert [(p["rejected"], p["rejected_open"], p["metainfos"]["absent"]) for p in pairs] == [
        (" ".join([COUNT, STAR_1, "A medium-sized blue circle"]), True, True),
        (" ".join([COUNT, "In the top left there is a small red heart."]), True, False)]
    assert pairs[0]["chosen"] == " ".join([COUNT, STAR_1, HEART, STAR_2]) and pairs[1]["idx"] == 1



def test_hedge_pairs_call_the_unsure_shapes_by_the_hedge_word_and_nothing_else(tmp_path):
    from mllm.course.self_pairs import correct_shapes, named_shape_pairs, shape_pairs, unsure_shapes
    from mllm.eval import chair
    from mllm.world.scenes import CATEGORIES, DOUBLE_WORDS

    circle = " ".join([COUNT, STAR_1, "A medium-sized blue circle is in the center.", STAR_2])
    # the unsure sentence (the second) is hedged; the misnamed one elsewhere would be renamed
    hedged = " ".join([COUNT, STAR_1, "A medium-sized blue object is in the center.", STAR_2])
    cut = " ".join([COUNT, STAR_1, "A medium-sized blue circle"])
    assert correct_shapes(circle, SCENE, "object", unsure={1}) == (hedged, cut, True)
    assert correct_shapes(circle, SCENE, "object") == (hedged, cut, True)  # a misnamed shape is hedged too
    # a right shape hedged (the first sentence) and the misnamed one after it; the cut at the first change
    assert correct_shapes(circle, SCENE, None, unsure={0}) == correct_shapes(circle, SCENE)  # no hedge word: renamed
    assert correct_shapes(circle, SCENE, "object", unsure={0}) == (
        " ".join([COUNT, "A small red object is in the top left.", "A medium-sized blue object is in the center.",
                  STAR_2]),
        " ".join([COUNT, "A small red star"]), False)
    assert correct_shapes(" ".join([COUNT, STAR_1, HEART, STAR_2]), SCENE, "object") is None
    right = " ".join([COUNT, STAR_1, HEART, STAR_2])
    rows = [_row("s", circle, 0), _row("s", right, 1), _row("s", right, 2)]
    # probabilities per shape word: the first answer unsure of its second shape, the third of its first
    def dists(*values):  # the probability of each written shape word (star, circle or heart, star), 0.01 the others
        return [[{"star": 0.01, "circle": 0.01, "heart": 0.01} | {name: value} for name, value in zip(names, row)]
                for names, row in zip([("star", "circle", "star")] + [("star", "heart", "star")] * 2, values)]

    unsure = unsure_shapes(dists([0.99, 0.4, 0.95], [0.9, 0.8, 0.99], [0.5, 0.9, 0.9]), rows, below=0.7)
    assert unsure == [{1}, set(), {0}]
    assert unsure_shapes(dists([0.1, 0.2]), rows[:1], below=0.7) == [set()]  # two words for three sentences: none
    pairs = shape_pairs(rows, {"s": SCENE}, "object", unsure)
    assert [(p["chosen"], p["metainfos"]["source"]) for p in pairs] == [
        (hedged, "hedge"), (" ".join([COUNT, "A small red object is in the top left.", HEART, STAR_2]), "hedge")]
    assert [p["chosen"] for p in shape_pairs(rows, {"s": SCENE}, "object")] == [hedged]  # misnamed alone
    # named pairs come from the right, sure answer alone: chosen as written, rejected cut at a hedged shape word
    named = named_shape_pairs(rows, {"s": SCENE}, 5, unsure, seed=0)
    assert len(named) == 1 and named[0]["chosen"] == right and named[0]["rejected_open"] is True
    assert named[0]["rejected"] in {" ".join([COUNT, "A small red object"]),
                                    " ".join([COUNT, STAR_1, "A medium-sized blue object"]),
                                    " ".join([COUNT, STAR_1, HEART, "A small red object"])}
    # the hedge word is no object to CHAIR: the hedged description names the two stars and nothing hallucinated
    (tmp_path / "chair_gt.json").write_text(json.dumps({"vocabulary": CATEGORIES, "double_words": DOUBLE_WORDS,
                                                        "images": {"s": ["heart", "star"]}}))
    vocab, gt = chair.load_chair_gt(tmp_path / "chair_gt.json")
    scored = chair.score([{"image_id": "s", "caption": hedged}], gt, vocab)
    assert scored["sentences"][0]["mscoco_generated_words"] == ["star", "star"]
    assert scored["sentences"][0]["mscoco_hallucinated_words"] == []




def test_shape_word_probabilities_are_the_models_own(tmp_path):
    """Each shape word's probability equals exp of the log-prob difference of the description cut after it and cut
    before it, from the reference log-prob pass (`mllm.train.logp`, tested on its own)."""
    from mllm.course.shape_confidence import shape_word_probs
    from mllm.model.random_checkpoint import make_random_checkpoint
    from mllm.model.tokenization import load_tokenizer
    from mllm.train.logp import compute_reference_logps, read_cache
    from mllm.world.synth import generate

    generate(tmp_path / "world", n_train=2, n_test=1, seed=0, progress=False)
    tiny_checkpoint = tmp_path / "model"  # a tokenizer that holds "circle" and "star" whole, not "hexagon"
    corpus = ["Describe the image in detail.", "A small red circle is in the top left.", "Yes", "No",
              "The image shows two objects. A small blue star is in the center.", "a hexagon"]
    make_random_checkpoint(tiny_checkpoint, "tiny", texts=corpus * 20 + ["a small blue star", "a red circle"] * 40,
                           vocab_size=300)
    tokenizer = load_tokenizer(tiny_checkpoint)
    assert [len(tokenizer.encode(" " + w, add_special_tokens=False)) for w in ("circle", "star")] == [1, 1]
    assert len(tokenizer.encode(" hexagon", add_special_tokens=False)) > 1
    text = "A small red circle is in the top left. A small blue star is in the center."
    rows = [{"question": "Describe the image in detail.", "answer": text,
             "metainfos": {"image_id": "synth_train_000000", "image_path": "images/train/synth_train_000000.png"}}]
    hexagon = dict(rows[0], answer=text.replace("circle", "hexagon"))
    probs = shape_word_probs(tiny_checkpoint, rows + [hexagon], tmp_path / "world")
    # a shape name of several tokens is not scored: one probability for two shape words (`unsure_shapes` skips it)
    assert len(probs) == 2 and len(probs[0]) == 2 and len(probs[1]) == 1
    assert set(probs[0][0]) == {"circle", "star"} and sum(probs[0][0].values()) < 1.0  # the one-token names
    words = text.split(" ")
    cuts = [(" ".join(words[:3]), " ".join(words[:4])), (" ".join(words[:12]), " ".join(words[:13]))]
    pairs = [{"idx": k, "question": rows[0]["question"], "chosen": after, "rejected": before, "rejected_open": True,
              "image_path": rows[0]["metainfos"]["image_path"]} for k, (before, after) in enumerate(cuts)]
    (tmp_path / "cuts.json").write_text(json.dumps(pairs))
    for k in range(2):  # the chosen side scores its end token too: cut it off with a pair of the same text, open
        pairs.append({"idx": 2 + k, "question": rows[0]["question"], "chosen": cuts[k][1], "rejected": cuts[k][1],
                      "rejected_open": True, "image_path": rows[0]["metainfos"]["image_path"]})
    (tmp_path / "cuts.json").write_text(json.dumps(pairs))
    cache = read_cache(compute_reference_logps(tiny_checkpoint, tmp_path / "cuts.json", tmp_path / "world",
                                               progress=False))[1]
    for k in range(2):
        expected = math.exp(cache[str(2 + k)]["rejected_logp"] - cache[str(k)]["rejected_logp"])
        assert probs[0][k][("circle", "star")[k]] == pytest.approx(expected, rel=1e-4)

def test_box_anchors_prefer_the_true_box_to_another_objects():
    from mllm.course.self_pairs import box_anchor_pairs

    def rec(i, image, box):
        return {"id": f"REC_{i}", "image": image, "conversations": [
            {"role": "user", "content": f"<image>\nWhere is thing {i} in image? answer in [x0,y0,x1,y1] format."},
            {"role": "assistant", "content": box}]}

    records = [rec(0, "a.png", "[1,2,3,4]"), rec(1, "a.png", "[5,6,7,8]"), rec(2, "b.png", "[9,9,20,20]")]
    pairs = box_anchor_pairs(records, 5, seed=0)
    # b.png has one object: no wrong box to offer
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("[1,2,3,4]", "[5,6,7,8]"), ("[5,6,7,8]", "[1,2,3,4]")]
    assert all(p["question"].startswith("Where is thing") and p["image_path"] == "a.png" for p in pairs)
    assert [p["idx"] for p in pairs] == [0, 1] and len(box_anchor_pairs(records, 1, seed=0)) == 1


def test_build_pairs_continuation_describes_each_image_once_greedily(tiny_checkpoint, tmp_path):
    from mllm.world.synth import generate

    world = tmp_path / "world"
    generate(world, n_train=4, n_test=1, seed=0, progress=False)
    out = tmp_path / "pairs"
    summary = build_pairs(tiny_checkpoint, world, out, n_images=3, max_new_tokens=6, mode="continuation",
                          yesno_anchors=0.5, box_anchors=1.0, count_anchors=0.5)
    answers = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and {a["run"]["decoding"] for a in answers} == {"greedy"}
    pairs = json.loads((out / "pairs.json").read_text())
    # six tokens of a random model never describe a scene right: every image it wrote something for gives a pair
    # (empty answers are dropped), then half as many yes/no anchors, half as many count anchors, as many box anchors
    described = summary["samples"]
    assert described >= 1 and sum(bool(a["answer"].strip()) for a in answers) == described
    sources = sorted(p["metainfos"]["source"] for p in pairs)
    assert sources == sorted(["continuation"] * described + ["yesno_anchor"] * round(0.5 * described)
                             + ["count_anchor"] * round(0.5 * described) + ["box_anchor"] * described)
    assert [p["idx"] for p in pairs] == list(range(len(pairs)))
    assert all(p["chosen"].startswith("The image shows") for p in pairs if p["metainfos"]["source"] == "continuation")
    # hedge pairs from the same greedy descriptions (reused), aimed by the model's own shape probabilities too: six
    # random tokens name no object, so no pair and no anchor
    assert main(["--model", str(tiny_checkpoint), "--world", str(world), "--out", str(out), "--images", "3",
                 "--max-new-tokens", "6", "--mode", "hedge", "--hedge-below", "0.5", "--named-shapes", "1",
                 "--count-anchors", "1"]) == 0
    assert json.loads((out / "pairs_summary.json").read_text())["mode"] == "hedge"
    assert json.loads((out / "pairs.json").read_text()) == []
