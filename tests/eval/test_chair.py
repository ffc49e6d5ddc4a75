"""CHAIR: hand-worked captions with exact mentions, hallucination counts and token lengths under both COCO
vocabularies; a hand-worked corpus with pinned metrics per vocabulary; the original table checked against its
source; corpus pooling; synthetic-world vocabulary; COCO ground-truth building and caching; the restricted
unpickler; the CLI."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import sys
from collections import defaultdict

import pytest

from mllm.cli import eval_chair
from mllm.eval import chair, coco_vocab, coco_vocab_original
from mllm.eval.chair import UnknownImageIdError, Vocabulary, score, singularize, tokenize

ORIGINAL = Vocabulary.coco()  # the default: the CHAIR paper's tables
MLLM = Vocabulary.coco("mllm")
VOCABS = {"original": ORIGINAL, "mllm": MLLM}

# (caption, GT objects, expected (word, node) mentions, expected hallucinated mentions, expected Len) under "mllm"
CASES = [
    ("A man riding a horse.", ["person", "horse"], [("man", "person"), ("horse", "horse")], 0, 6),
    ("Two men and a woman.", ["person"], [("man", "person"), ("woman", "person")], 0, 6),
    ("People walking past children.", [], [("person", "person"), ("child", "person")], 2, 5),
    ("A teddy bear on a bed.", ["teddy bear", "bed"], [("teddy bear", "teddy bear"), ("bed", "bed")], 0, 6),
    ("A teddy bear on a bed.", ["bear", "bed"], [("teddy bear", "teddy bear"), ("bed", "bed")], 1, 6),
    ("Two hot dogs with mustard.", ["hot dog"], [("hot dog", "hot dog")], 0, 5),
    ("A hot dog and a dog.", ["dog"], [("hot dog", "hot dog"), ("dog", "dog")], 1, 6),
    ("A man on a motor bike.", ["person", "motorcycle"], [("man", "person"), ("motor bike", "motorcycle")], 0, 6),
    ("A baby elephant walks.", ["elephant"], [("elephant", "elephant")], 0, 4),
    ("A baby sleeps in a bed.", ["bed"], [("baby", "person"), ("bed", "bed")], 1, 7),
    ("The passenger train arrives.", ["train"], [("train", "train")], 0, 4),
    ("A passenger on a train.", ["train"], [("passenger", "person"), ("train", "train")], 1, 6),
    ("A toilet with the seat up.", ["toilet"], [("toilet", "toilet")], 0, 7),
    ("A toilet seat.", ["toilet"], [("toilet", "toilet")], 0, 3),
    ("A seat by the window.", [], [("seat", "chair")], 1, 6),
    ("A puppy plays with a kitten.", ["dog"], [("puppy", "dog"), ("kitten", "cat")], 1, 7),
    ("The sky is blue and the grass is green.", [], [], 0, 10),
    ("A dog, a dog and another dog!", ["cat"], [("dog", "dog")] * 3, 3, 9),
    ("Several skis and a snowboard.", ["skis"], [("ski", "skis"), ("snowboard", "snowboard")], 1, 6),
    ("Knives and forks on dining tables.", ["knife", "fork", "dining table"],
     [("knife", "knife"), ("fork", "fork"), ("dining table", "dining table")], 0, 6),
    ("Wine glasses on a shelf.", ["wine glass"], [("wine glass", "wine glass")], 0, 5),
    ("She wears glasses.", [], [], 0, 4),
    ("Buses and trucks.", ["bus"], [("bus", "bus"), ("truck", "truck")], 1, 4),
    ("A cell phone and a laptop computer.", ["cell phone", "laptop"],
     [("cell phone", "cell phone"), ("laptop computer", "laptop")], 0, 6),
    ("A computer mouse next to a keyboard.", ["mouse", "keyboard"],
     [("mouse", "mouse"), ("keyboard", "keyboard")], 0, 7),
    ("Geese near the benches.", ["bird", "bench"], [("goose", "bird"), ("bench", "bench")], 0, 5),
    ("Mice don't eat pizzas.", ["pizza"], [("mouse", "mouse"), ("pizza", "pizza")], 1, 6),
    ("Children's toothbrushes.", ["toothbrush"], [("child", "person"), ("toothbrush", "toothbrush")], 1, 4),
    ("A bow tie.", ["tie"], [("tie", "tie")], 0, 3),
    ("An adult giraffe and a baby zebra.", ["giraffe", "zebra"], [("giraffe", "giraffe"), ("zebra", "zebra")], 0, 6),
    ("A cheesecake and a doughnut.", ["cake"], [("cheesecake", "cake"), ("doughnut", "donut")], 1, 6),
    ("A hair dryer.", ["hair drier"], [("hair dryer", "hair drier")], 0, 3),
    ("A stop sign near a fire hydrant.", ["stop sign"],
     [("stop sign", "stop sign"), ("fire hydrant", "fire hydrant")], 1, 6),
    ("The home plate.", [], [], 0, 3),
    ("Sheep and a goat.", ["sheep"], [("sheep", "sheep"), ("goat", "sheep")], 0, 5),
    ("An orange cat.", ["cat"], [("orange", "orange"), ("cat", "cat")], 1, 4),  # known word-sense collision
    ("A T-shirt, 3.5 inches.", [], [], 0, 6),
    ("Policemen on motorcycles.", ["person", "motorcycle"],
     [("policeman", "person"), ("motorcycle", "motorcycle")], 0, 4),
]


# The captions of CASES that the original tables read differently: (mentions, hallucinated mentions, Len).
ORIGINAL_DIFFERS = {
    # merged "motor bike" is no entry (the table's is " motor bike"): no motorcycle mention
    "A man on a motor bike.": ([("man", "person")], 0, 6),
    # "dining table" is no double word: "dining" + "table" (table -> dining table), one token more
    "Knives and forks on dining tables.": (
        [("knife", "knife"), ("fork", "fork"), ("table", "dining table")], 0, 7),
    # no "computer mouse" rule: "computer" fires laptop (hallucinated), then "mouse"
    "A computer mouse next to a keyboard.": (
        [("computer", "laptop"), ("mouse", "mouse"), ("keyboard", "keyboard")], 1, 8),
    # the table's " cheesecake" has a leading space: only the doughnut counts (still hallucinated)
    "A cheesecake and a doughnut.": ([("doughnut", "donut")], 1, 6),
    # "hair dryer" is no entry (only "hair drier", "hairdryer") and does not merge: no mention, 4 tokens
    "A hair dryer.": ([], 0, 4),
}


@pytest.mark.parametrize("vocabulary", ["mllm", "original"])
@pytest.mark.parametrize("caption,gt,mentions,n_hallucinated,length", CASES)
def test_hand_worked_caption(caption, gt, mentions, n_hallucinated, length, vocabulary):
    vocab = VOCABS[vocabulary]
    if vocabulary == "original" and caption in ORIGINAL_DIFFERS:
        mentions, n_hallucinated, length = ORIGINAL_DIFFERS[caption]
    result = score([{"image_id": 1, "caption": caption}], {1: gt}, vocab)
    sentence = result["sentences"][0]
    words = sentence["words"]
    assert [(words[i], node) for i, _, node in vocab.parse(caption)[1]] == mentions
    assert len(sentence["mscoco_hallucinated_words"]) == n_hallucinated
    assert [words[i] for i in sentence["hallucination_idxs"]] == [w for w, _ in sentence["mscoco_hallucinated_words"]]
    assert sentence["metrics"]["Len"] == length == result["overall_metrics"]["Len"]
    assert result["overall_metrics"]["CHAIRs"] == (1.0 if n_hallucinated else 0.0)
    assert result["overall_metrics"]["CHAIRi"] == (n_hallucinated / len(mentions) if mentions else 0.0)


# A hand-worked corpus: (image id, GT node words, caption). Per-caption counts are in PINNED below.
CORPUS = [
    # A: plural "dogs" -> dog; "hot dogs" merges to one hot dog mention (dog does not fire from it); the lone
    #    "dog" is hallucinated. 3 mentions (person, hot dog, dog), 1 hallucinated; recall 2/2. Same under both.
    (1, ["person", "hot dog"], "A man eats two hot dogs next to a dog."),
    # B: "baby elephant" / "adult elephants" merge to elephant, so neither "baby" nor "adult" fires person.
    #    2 mentions, 0 hallucinated; recall 1/1. Same under both.
    (2, ["elephant"], "A baby elephant walks behind the adult elephants."),
    # C: "toilet seat" merges to toilet; the later lone "seat" is dropped because "toilet" is in the caption
    #    (else seat -> chair). 1 mention, 0 hallucinated; recall 1/1. Same under both.
    (3, ["toilet"], "A toilet seat is up and the seat is cracked."),
    # D: original: "motor bike" merges into the token "motor bike", but the table's entry is " motor bike"
    #    (leading space): no mention, the hallucinated motorbike goes unnoticed. 1 mention (man), 0 hallucinated.
    #    mllm: motor bike -> motorcycle, hallucinated. 2 mentions, 1 hallucinated. Recall 1/1 under both.
    (4, ["person"], "A man rides a motor bike."),
    # E: original: no "computer monitor" rule, so "computer" fires laptop (hallucinated) and "monitor" fires tv.
    #    3 mentions, 1 hallucinated. mllm: "computer monitor" -> monitor -> tv. 2 mentions, 0 hallucinated.
    #    Recall 2/2 under both.
    (5, ["tv", "keyboard"], "A computer monitor and a keyboard."),
    # F: "passenger train" merges to train, but the plural "passengers" -> passenger still fires person
    #    (hallucinated). 2 mentions, 1 hallucinated; recall 1/1. Same under both.
    (6, ["train"], "A passenger train waits while passengers board."),
    # G: a repeated mention counts twice: 3 mentions (dog, dog, cat), 2 hallucinated; recall 1/1. Same under both.
    (7, ["cat"], "A dog sleeps while another dog barks at a cat."),
    # H: the GT cup is absent from the caption: recall 2/3 (table -> dining table, pizza). 2 mentions,
    #    0 hallucinated. Same under both.
    (8, ["dining table", "pizza", "cup"], "A pizza on a table."),
    # I: original: " cheesecake" (leading space) and "iPhone" (capitalised) never match a lowercased token:
    #    0 mentions, recall 0/1. mllm: cheesecake -> cake, iphone -> cell phone (hallucinated): 2 mentions,
    #    1 hallucinated, recall 1/1.
    (9, ["cake"], "A cheesecake next to an iPhone."),
]

# vocabulary -> (CHAIRs, CHAIRi, Recall, hallucinated (word, node) pairs per caption, in caption order)
PINNED = {
    # 4 of 9 captions (A E F G); 5 of 3+2+1+1+3+2+3+2+0 = 17 mentions; recalled 2+1+1+1+2+1+1+2+0 = 11 of 13
    "original": (4 / 9, 5 / 17, 11 / 13, [
        [("dog", "dog")], [], [], [], [("computer", "laptop")], [("passenger", "person")],
        [("dog", "dog"), ("dog", "dog")], [], []]),
    # 5 of 9 captions (A D F G I); 6 of 3+2+1+2+2+2+3+2+2 = 19 mentions; recalled 11 + 1 (cake in I) = 12 of 13
    "mllm": (5 / 9, 6 / 19, 12 / 13, [
        [("dog", "dog")], [], [], [("motor bike", "motorcycle")], [], [("passenger", "person")],
        [("dog", "dog"), ("dog", "dog")], [], [("iphone", "cell phone")]]),
}


@pytest.mark.parametrize("vocabulary", ["original", "mllm"])
def test_hand_worked_corpus_under_both_vocabularies(vocabulary):
    captions = [{"image_id": image_id, "caption": caption} for image_id, _, caption in CORPUS]
    gt = {image_id: objects for image_id, objects, _ in CORPUS}
    result = score(captions, gt, VOCABS[vocabulary])
    chair_s, chair_i, recall, hallucinated = PINNED[vocabulary]
    m = result["overall_metrics"]
    assert (m["CHAIRs"], m["CHAIRi"], m["Recall"]) == (pytest.approx(chair_s), pytest.approx(chair_i),
                                                       pytest.approx(recall))
    assert [[tuple(pair) for pair in s["mscoco_hallucinated_words"]] for s in result["sentences"]] == hallucinated
    assert result["vocabulary"] == vocabulary
    assert chair.format_table(result).startswith(f"CHAIR  vocabulary={vocabulary}  captions=9")


def test_default_vocabulary_is_the_original():
    assert Vocabulary.coco().fingerprint() == ORIGINAL.fingerprint() != MLLM.fingerprint()
    assert chair.COCO_VOCABULARIES == ("original", "mllm")
    with pytest.raises(ValueError, match="original, mllm"):
        Vocabulary.coco("paper")


# The 80 COCO category names in COCO category order (ids 1..90 with gaps), as in instances_*.json.
COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)


def test_original_table_is_the_papers_file():
    """LisaAnne/Hallucination data/synonyms.txt: 80 lines, 3577 bytes, 416 entries (403 distinct), pinned sha256."""
    original = coco_vocab_original
    assert original.synonyms_txt_sha256() == original.SYNONYMS_TXT_SHA256
    assert len(original.SYNONYMS_TXT) == 3577 and original.SYNONYMS_TXT.count("\n") == 80
    assert tuple(original.ORIGINAL_SYNONYMS) == COCO_CATEGORIES == tuple(coco_vocab.COCO_SYNONYMS)
    entries = [e for line in original.ORIGINAL_SYNONYMS.values() for e in line]
    assert (len(entries), len(set(entries))) == (416, 403)
    longest = ("person", "bird", "boat", "dog", "car")
    assert [len(original.ORIGINAL_SYNONYMS[k]) for k in longest] == [67, 59, 32, 31, 13]
    assert {" motor bike", " cheesecake", "iPhone"} <= set(entries)
    assert len(original.ORIGINAL_DOUBLE_WORDS) == 55  # as the double_word_dict of Maxlinn's chair.pkl
    assert [original.ORIGINAL_DOUBLE_WORDS[k] for k in ("bow tie", "toilet seat", "wine glas", "passenger jet",
                                                        "baby cub", "train track", "home plate")] == [
        "tie", "toilet", "wine glass", "jet", "cub", "train track", "home plate"]
    # the quirks never match: lowercased caption tokens never carry a leading space or a capital
    assert ORIGINAL.objects("A motor bike, a cheesecake and an iPhone.") == set()
    assert MLLM.objects("A motor bike, a cheesecake and an iPhone.") == {"motorcycle", "cake", "cell phone"}
    # pairs only: the three-word "stove top oven" never merges, so stove and oven are two mentions
    assert [node for _, _, node in ORIGINAL.parse("A stove top oven.")[1]] == ["oven", "oven"]


def test_mllm_docstring_lists_every_difference():
    """Each node word whose entries differ has one docstring line naming exactly the added and removed entries."""
    listed = {}
    for block in re.findall(r"^- ([a-z ]+): (.*?)(?=^- |\Z)", coco_vocab.__doc__.split("per node word")[1],
                            re.S | re.M):
        node, text = block
        added, _, removed = text.partition("removed ")
        listed[node] = (re.findall(r'"([^"]*)"', added) if added.startswith("added") else [],
                        re.findall(r'"([^"]*)"', removed))
    expected = {}
    for node, entries in coco_vocab_original.ORIGINAL_SYNONYMS.items():
        ours, theirs = coco_vocab.COCO_SYNONYMS[node], list(dict.fromkeys(entries))
        diff = ([e for e in ours if e not in theirs], [e for e in theirs if e not in ours])
        if diff != ([], []):
            expected[node] = diff
    assert listed == expected


def test_tokenizer_and_singularizer():
    assert tokenize("Don't touch the dog's ball... It can't!") == [
        "do", "n't", "touch", "the", "dog", "'s", "ball", "...", "it", "ca", "n't", "!"]
    assert tokenize("1,000 t-shirts (3.5%)") == ["1,000", "t-shirts", "(", "3.5", "%", ")"]
    plural_to_singular = {
        "men": "man", "women": "woman", "people": "person", "children": "child", "mice": "mouse",
        "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife", "leaves": "leaf",
        "shelves": "shelf", "buses": "bus", "glasses": "glass", "dishes": "dish", "boxes": "box",
        "benches": "bench", "skis": "ski", "ties": "tie", "puppies": "puppy", "cookies": "cookie",
        "gloves": "glove", "horses": "horse", "shoes": "shoe", "potatoes": "potato", "sandwiches": "sandwich",
        "policemen": "policeman", "oranges": "orange", "cats": "cat",
    }
    assert {w: singularize(w) for w in plural_to_singular} == plural_to_singular
    for unchanged in ("glass", "bus", "tennis", "scissors", "sheep", "is", "was", "this", "famous", "grass"):
        assert singularize(unchanged) == unchanged


def test_corpus_pooling():
    captions = [
        {"image_id": 1, "caption": "A man rides a horse next to a man."},
        {"image_id": 2, "caption": "A dog, a dog and a cat."},
        {"image_id": 3, "caption": "An empty room."},
    ]
    gt = {1: ["person", "horse", "dog"], 2: ["cat"], 3: ["bed", "person"]}
    result = score(captions, gt, ORIGINAL)
    m = result["overall_metrics"]
    assert m["CHAIRs"] == pytest.approx(1 / 3)
    assert m["CHAIRi"] == pytest.approx(2 / 6)  # pooled over mentions, every "dog" counted
    assert m["Recall"] == pytest.approx(3 / 6)  # (2 + 1 + 0) distinct recalled / (3 + 1 + 2) GT classes
    assert m["Len"] == pytest.approx((10 + 9 + 4) / 3)
    second = result["sentences"][1]
    assert second["hallucination_idxs"] == [1, 4]
    assert second["mscoco_hallucinated_words"] == [["dog", "dog"], ["dog", "dog"]]
    assert second["metrics"] == {"CHAIRs": 1, "CHAIRi": pytest.approx(2 / 3), "Recall": 1.0, "Len": 9}
    assert result["counts"]["mentions"] == 6


def test_unknown_ids_raise_and_empty_captions_are_reported():
    gt = {42: ["dog"], "synth_test_000007": ["circle"]}
    with pytest.raises(UnknownImageIdError, match="43"):
        score([{"image_id": 42, "caption": "a dog"}, {"image_id": 43, "caption": "a cat"}], gt, ORIGINAL)
    result = score([{"image_id": "COCO_val2014_000000000042.jpg", "caption": "A dog."},
                    {"image_id": "42", "caption": "   "}], gt, ORIGINAL)
    assert result["counts"]["captions"] == 1 and result["overall_metrics"]["CHAIRs"] == 0.0
    assert result["skipped"] == [{"index": 1, "image_id": "42", "reason": "empty caption"}]
    assert chair.image_id_of({"metainfos": {"image_id": 5}}) == 5


def _synthetic_world(tmp_path, n_images=40):
    vocabulary = {"circle": ["circle", "ring", "disc"], "square": ["square", "box"], "triangle": ["triangle"],
                  "star": ["star"], "heart": ["heart"], "traffic cone": ["traffic cone", "cone"]}
    names = list(vocabulary)
    images = {f"synth_test_{i:06d}": [names[i % 6], names[(i + 1) % 6], names[(i + 3) % 6]][: 1 + i % 3]
              for i in range(n_images)}
    path = tmp_path / "chair_gt.json"
    path.write_text(json.dumps({"vocabulary": vocabulary, "double_words": {"ice cream cone": "ice cream"},
                                "images": images}))
    return path, images, vocabulary


def test_synthetic_vocabulary_clean_and_injected(tmp_path):
    path, images, vocabulary = _synthetic_world(tmp_path)
    vocab, gt = chair.load_chair_gt(path)
    colours = ["red", "blue", "green"]

    plurals = {"circle": "rings", "square": "boxes", "triangle": "triangles", "star": "stars", "heart": "hearts",
               "traffic cone": "traffic cones"}

    def describe(i, objects):  # alternately a plural synonym and the canonical name
        parts = [f"two {plurals[o]}" if (i + k) % 2 else f"a {colours[k]} {o}" for k, o in enumerate(objects)]
        return "In this image there are " + ", ".join(parts) + ". An ice cream cone is not an object here."

    clean = [{"image_id": image_id, "caption": describe(i, objs)} for i, (image_id, objs) in enumerate(images.items())]
    result = score(clean, gt, vocab)
    assert result["overall_metrics"]["CHAIRs"] == 0.0 and result["overall_metrics"]["CHAIRi"] == 0.0
    assert result["overall_metrics"]["Recall"] == 1.0

    injected = []
    for i, record in enumerate(clean):
        extra = next(o for o in vocabulary if o not in images[record["image_id"]])
        caption = record["caption"] + (f" A small {extra} too." if i % 5 == 0 else "")
        injected.append({"image_id": record["image_id"], "caption": caption})
    result = score(injected, gt, vocab)
    assert result["overall_metrics"]["CHAIRs"] == 8 / 40
    assert result["counts"]["hallucinated_mentions"] == 8


def test_synthetic_world_descriptions():
    """The synthetic world's own texts: faithful descriptions score 0; one injected object in every 4th -> 0.25."""
    scenes = pytest.importorskip("mllm.world.scenes")
    import random

    vocab = Vocabulary(scenes.CATEGORIES, scenes.DOUBLE_WORDS)
    gt, faithful, injected = {}, [], []
    for i in range(80):
        rng = random.Random(f"chair-test/{i}")
        scene = scenes.sample_scene(rng, f"synth_test_{i:06d}")
        gt[scene.image_id] = sorted({o.category for o in scene.objects})
        mentions = scenes.scene_mentions(scene, rng, 0.5)
        faithful.append({"image_id": scene.image_id, "caption": scenes.detailed_description(mentions, i % 2)})
        faithful.append({"image_id": scene.image_id,
                         "caption": scenes.short_description(scenes.scene_mentions(scene, rng))})
        if i % 4 == 0:
            mentions = scenes.with_extra_mention(mentions, scenes.absent_mention(scene, rng, mentions), rng)
        injected.append({"image_id": scene.image_id, "caption": scenes.detailed_description(mentions, i % 2)})
    clean = score(faithful, gt, vocab)["overall_metrics"]
    assert (clean["CHAIRs"], clean["CHAIRi"], clean["Recall"]) == (0.0, 0.0, 1.0)
    noisy = score(injected, gt, vocab)
    assert noisy["overall_metrics"]["CHAIRs"] == 0.25
    assert noisy["counts"]["hallucinated_mentions"] == 20


def _write_coco(root, with_val_captions=True):
    categories = [{"id": 1, "name": "person", "supercategory": "person"},
                  {"id": 18, "name": "dog", "supercategory": "animal"}]
    files = {
        "instances_train2014.json": {"images": [{"id": 1}], "categories": categories, "annotations": [
            {"id": 10, "image_id": 1, "category_id": 18, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}]},
        "instances_val2014.json": {"images": [{"id": 2}, {"id": 3}], "categories": categories, "annotations": []},
        "captions_train2014.json": {"images": [{"id": 1}], "annotations": [
            {"id": 1, "image_id": 1, "caption": "A man walking his dog."}]},
        "captions_val2014.json": {"images": [{"id": 2}, {"id": 3}], "annotations": [
            {"id": 2, "image_id": 2, "caption": "A cat on a couch."}]},
    }
    if not with_val_captions:
        del files["captions_val2014.json"]
    for name, data in files.items():
        (root / name).write_text(json.dumps(data))


def test_build_coco_gt_and_cache(tmp_path):
    (tmp_path / "partial").mkdir()
    _write_coco(tmp_path / "partial", with_val_captions=False)
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        chair.build_coco_gt(tmp_path / "partial")
    _write_coco(tmp_path)
    cache = tmp_path / "cache.json"
    gt = chair.build_coco_gt(tmp_path, ORIGINAL, cache)
    assert gt == {1: ["dog", "person"], 2: ["cat", "couch"], 3: []}
    assert chair.build_coco_gt(tmp_path / "nowhere", ORIGINAL, cache) == gt  # served from the JSON cache
    vocab, from_cache = chair.load_chair_gt(cache)
    assert from_cache == gt and vocab.fingerprint() == ORIGINAL.fingerprint()
    assert (vocab.name, vocab.literal, vocab.node_of) == ("original", True, ORIGINAL.node_of)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"answer": "A cat and a dog on a sofa.",
                                   "metainfos": {"image_id": "COCO_val2014_000000000002.jpg"}}) + "\n")
    out = tmp_path / "result.json"
    assert eval_chair.main(["--answers", str(answers), "--coco-annotations", str(tmp_path), "--cache", str(cache),
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["sentences"][0]["mscoco_hallucinated_words"] == [["dog", "dog"]]
    assert result["overall_metrics"]["CHAIRi"] == pytest.approx(1 / 3)


def _pickled_chair(monkeypatch, imid_to_objects, protocol):
    cls = type("CHAIR", (), {})
    cls.__module__ = "__main__"
    monkeypatch.setattr(sys.modules["__main__"], "CHAIR", cls, raising=False)
    obj = cls()
    obj.imid_to_objects = imid_to_objects
    obj.coco_path = "data/annotations"
    obj.mscoco_objects = ["person", "dog", "puppy"]
    obj.inverse_synonym_dict = {"puppy": "dog"}
    obj.double_word_dict = {"hot dog": "hot dog"}
    return pickle.dumps(obj, protocol=protocol)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_unpickler_reads_chair_pickle(tmp_path, monkeypatch, protocol):
    blob = _pickled_chair(monkeypatch, defaultdict(list, {42: {"dog", "person"}, 7: set()}), protocol)
    pkl = tmp_path / "chair_300.pkl"
    pkl.write_bytes(blob)
    with pytest.raises(PermissionError, match="--trust-pickle"):
        chair.load_chair_pickle(pkl)
    out = tmp_path / "chair_300.json"
    assert chair.convert_chair_pickle(pkl, out, trust_pickle=True) == {42: ["dog", "person"], 7: []}
    vocab, gt = chair.load_chair_gt(out)
    assert gt == {42: ["dog", "person"], 7: []} and vocab.fingerprint() == ORIGINAL.fingerprint()


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    for blob in (pickle.dumps(_Exploit()), _pickled_chair(monkeypatch, {1: _Exploit()}, 4)):
        pkl = tmp_path / "evil.pkl"
        pkl.write_bytes(blob)
        with pytest.raises(pickle.UnpicklingError, match="system"):
            chair.load_chair_pickle(pkl, trust_pickle=True)


def test_cli(tmp_path, capsys, monkeypatch):
    path, images, _ = _synthetic_world(tmp_path, n_images=3)
    lines = [json.dumps({"idx": 0, "answer": "A red circle and a ring.",
                         "metainfos": {"image_id": "synth_test_000000"}}),
             "{not json",
             json.dumps({"idx": 1, "answer": "", "image_id": "synth_test_000001"}),
             json.dumps({"idx": 2, "answer": "A square.", "image_id": "synth_test_000002"})]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(lines) + "\n")
    out = tmp_path / "result.json"
    assert eval_chair.main(["--answers", str(answers), "--chair-gt", str(path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert images["synth_test_000000"] == ["circle"]
    assert images["synth_test_000002"] == ["triangle", "star", "traffic cone"]
    assert result["overall_metrics"]["CHAIRs"] == 0.5 and result["counts"]["captions"] == 2
    assert [(s["line"], s["reason"].split(":")[0]) for s in result["skipped"]] == [(2, "malformed JSON"),
                                                                                  (3, "empty caption")]
    assert "CHAIRs" in capsys.readouterr().out
    pkl = tmp_path / "chair.pkl"
    pkl.write_bytes(_pickled_chair(monkeypatch, {1: {"dog"}}, 4))
    assert eval_chair.main(["--answers", str(answers), "--chair-pkl", str(pkl), "--out", str(out)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err


def test_cli_vocabulary(tmp_path, capsys):
    _write_coco(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"answer": "A man on a motor bike with a cheesecake.", "image_id": 1}) + "\n")
    out = tmp_path / "result.json"
    hallucinated = {}
    for vocabulary in (None, "original", "mllm"):
        flag = ["--vocabulary", vocabulary] if vocabulary else []
        assert eval_chair.main(["--answers", str(answers), "--coco-annotations", str(tmp_path), "--out", str(out),
                                *flag]) == 0
        result = json.loads(out.read_text())
        name = vocabulary or "original"
        assert result["vocabulary"] == name and f"vocabulary={name}" in capsys.readouterr().out
        assert (tmp_path / f"chair_gt_coco2014_{name}.json").exists()  # one cache per vocabulary
        hallucinated[vocabulary] = result["sentences"][0]["mscoco_hallucinated_words"]
    # GT of image 1 is {dog, person}: the original never sees the motor bike or the cheesecake
    assert hallucinated[None] == hallucinated["original"] == []
    assert hallucinated["mllm"] == [["motor bike", "motorcycle"], ["cheesecake", "cake"]]
    world, _, _ = _synthetic_world(tmp_path, n_images=3)
    assert eval_chair.main(["--answers", str(answers), "--chair-gt", str(world), "--vocabulary", "mllm",
                            "--out", str(out)]) == 2
    assert "carries its own vocabulary" in capsys.readouterr().err


def _scored(image_id: str, hallucinated: int, mentions: int) -> dict:
    return {"image_id": image_id, "mscoco_hallucinated_words": [["hexagon", "hexagon"]] * hallucinated,
            "mscoco_generated_words": ["circle"] * mentions}


def test_paired_change_gives_relative_changes_with_bootstrap_bounds_around_them():
    from mllm.eval.chair import paired_change

    before = [_scored("a", 1, 2), _scored("b", 0, 2), _scored("c", 0, 2), _scored("d", 0, 2)]  # 1/4, 1/8
    after = [_scored("a", 0, 2), _scored("b", 0, 2), _scored("c", 1, 2), _scored("d", 1, 3)]  # 2/4, 2/9
    change = paired_change(before, after, draws=500)
    assert change["CHAIRs"][0] == pytest.approx(1.0) and change["CHAIRi"][0] == pytest.approx((2 / 9) / (1 / 8) - 1)
    for point, low, high in change.values():
        assert low <= point <= high and low < high
    # the same captions: no change and no spread; a clean bench that starts hallucinating: an infinite rise
    assert paired_change(before, before) == {"CHAIRs": (0.0, 0.0, 0.0), "CHAIRi": (0.0, 0.0, 0.0)}
    clean = [_scored(s["image_id"], 0, 2) for s in before]
    assert paired_change(clean, after, draws=50)["CHAIRs"][0] == math.inf
    with pytest.raises(ValueError, match="same images in the same order"):
        paired_change(before, after[::-1])
