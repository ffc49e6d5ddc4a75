"""Preference pairs from a model's own descriptions: the rule-based correction, the ranking, and the whole
sample -> score -> pair run on a tiny world (resumable, files written)."""

import json

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
