"""Preference pairs from the model's own descriptions, judged against the scenes' ground truth.

The world's `preference_train.json` corrupts correct descriptions (an extra object, a wrong shape or colour).
Those pairs are off-policy: the base model ranks them correctly before any training (reward accuracy ~0.97
from the first steps) and the errors they show are not the ones it makes, so aligning on them leaves its
CHAIR where it was. Here, as in RLHF-V / RLAIF-V, the model itself describes the training images.

"continuation": one greedy description per image, as the model answers when evaluated; where it goes wrong (a
wrong count, a repeat beyond the scene's count of that object, an absent object, objects left out) the chosen
answer is the same description up to that point, then the objects not yet named. The tiny base names the first
object right and repeats it ("A small red moon ... A small red moon ..."); the pair differs from the error on, so
DPO acts on the repeat itself. "cut" (the course's default since stop 45) ends the rejected side at its first wrong
word, so that the sentences after the error are not pushed down with it. The other modes sample each image several times
and let CHAIR count each sample's hallucinated mentions: "ranked" pairs the least hallucinating sample (ties: the
higher recall) with the most hallucinating one; "corrected", in the spirit of RLHF-V's corrected answers, pairs
each hallucinating sample with itself minus the sentences that name an object the image lacks; "balanced" adds,
for each, the corrected description against itself minus one true sentence, so that length alone no longer tells
chosen from rejected. CHAIR cannot see a repeat, and on a base that hallucinates little these modes find few pairs
(course13's base: 503 of 6,000 samples) and raise CHAIR (docs/probes/README.md, stop 44).

"shape" (the preference stage's default since stop 47) aims at what CHAIR counts on a base that names its scenes
well: about two thirds of its hallucinated mentions name the shape of an object that is there, at the colour and
place the sentence gives (a hexagon for a circle, a diamond for a square). Each greedy description that misnames a
shape gives one pair: chosen, the description with those shapes renamed; rejected, the description cut after the
first misnamed shape word. Measured on 1,200 fresh scenes (stop 47), the continuation pairs raised CHAIRs by 61 %
and cost 3.6 points of Recall; shape pairs of greedy descriptions left CHAIR within the bench's spread and Recall
where it was; shape pairs of sampled descriptions (misnamings the greedy decoding does not make) raised CHAIRs by
64-82 %.

    sample_questions(scenes, n_images, samples_per_image, seed)  -> question records (`mllm answer` format)
    rank_pairs(answers, sentences)                               -> pair records (the preference file format)
    correct_description(caption, hallucinated)                   -> the caption without its hallucinating sentences
    drop_true_sentences(caption, names_object, rng, k)           -> up to k copies, each minus one true sentence
    corrected_pairs(answers, sentences, vocab, gt, true_drops)   -> pair records
    continue_correctly(caption, scene)                           -> the caption up to its first error, then the rest
    cut_at_error(chosen, rejected)                               -> the rejected text to its first wrong word
    continuation_pairs(answers, scenes, cut)                     -> pair records
    correct_shapes(caption, scene)                               -> the caption with its misnamed shapes renamed
    shape_pairs(answers, scenes)                                 -> pair records
    yesno_anchor_pairs(items, n, seed)                           -> yes/no pair records (true answer chosen)
    count_anchor_pairs(scenes, n, seed, several)                 -> count yes/no pair records (true answer chosen)
    box_anchor_pairs(records, n, seed)                           -> grounding pair records (true box chosen)
    build_pairs(model_dir, world, out_dir, ...)                  -> pairs.json (decoding resumes like `mllm answer`)

`mllm preference pairs --model DIR --world DIR --out DIR` runs `build_pairs`.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Collection

from mllm.jsonio import write_json_atomic
from mllm.world.scenes import DETAILED_PROMPTS, NUMBER_WORDS, YESNO_SUFFIX, count_question, wrong_count


def sample_questions(scenes: list[dict], n_images: int, samples_per_image: int, seed: int = 0) -> list[dict]:
    """The first `n_images` training scenes, each asked one detailed-description prompt `samples_per_image`
    times (one `mllm answer` record per sample; the image path is kept in the record for the pair file)."""
    if samples_per_image < 2:
        raise ValueError(f"samples_per_image must be at least 2 to rank a pair, got {samples_per_image}")
    return _questions(scenes, n_images, samples_per_image, seed)


def _questions(scenes: list[dict], n_images: int, repeats: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    train = [s for s in scenes if s.get("split") == "train"][:n_images]
    records = []
    for scene in train:
        prompt = rng.choice(DETAILED_PROMPTS)
        records += [{"image": scene["image"], "question": prompt, "image_id": scene["image_id"],
                     "image_path": scene["image"]}] * repeats
    return records


def _aligned(answers: list[dict], sentences: list[dict]):
    """(answer, its CHAIR entry) pairs; refuses lists of different lengths or out of order."""
    if len(answers) != len(sentences):
        raise ValueError(f"{len(answers)} answers but {len(sentences)} scored captions")
    for answer, sentence in zip(answers, sentences):
        if sentence["image_id"] != answer["metainfos"]["image_id"]:
            raise ValueError(f"answers and scores are out of order: {answer['metainfos']['image_id']!r} vs "
                             f"{sentence['image_id']!r}")
        yield answer, sentence


def rank_pairs(answers: list[dict], sentences: list[dict]) -> list[dict]:
    """Pairs from scored samples: `answers` are `mllm answer` rows (question, answer, metainfos with image_id
    and image_path), `sentences` the matching per-caption entries of `chair.score` (same order).

    Per image: chosen = fewest hallucinated mentions, then highest recall; rejected = most hallucinated, then
    lowest recall; only images where chosen hallucinates strictly less give a pair."""
    by_image: dict[str, list[tuple[int, float, dict]]] = {}
    for answer, sentence in _aligned(answers, sentences):
        image_id = answer["metainfos"]["image_id"]
        hallucinated = len(sentence["mscoco_hallucinated_words"])
        by_image.setdefault(image_id, []).append((hallucinated, sentence["metrics"]["Recall"], answer))
    pairs = []
    for image_id, candidates in by_image.items():
        ranked = sorted(candidates, key=lambda c: (c[0], -c[1]))  # stable: the earlier sample wins a full tie
        best, worst = ranked[0], ranked[-1]
        if best[0] >= worst[0]:
            continue
        pairs.append({"idx": len(pairs), "question": best[2]["question"], "chosen": best[2]["answer"],
                      "rejected": worst[2]["answer"], "image_path": best[2]["metainfos"]["image_path"],
                      "metainfos": {"image_id": image_id, "chosen_hallucinated": best[0],
                                    "rejected_hallucinated": worst[0], "chosen_recall": round(best[1], 4),
                                    "rejected_recall": round(worst[1], 4), "samples": len(candidates)}})
    return pairs


_COUNT = re.compile(r"\b(shows) (\w+) (objects?)\b")


def _sentences(caption: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", caption.strip()) if s]


def _without(sentences: list[str], dropped: set[int]) -> str:
    """The sentences but those at the `dropped` indices, a "shows N objects" count lowered by their number."""
    def recount(match: re.Match) -> str:
        if match.group(2) not in NUMBER_WORDS:
            return match.group(0)
        n = max(NUMBER_WORDS.index(match.group(2)) - len(dropped), 1)
        return f"{match.group(1)} {NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'}"

    return " ".join(_COUNT.sub(recount, s) for i, s in enumerate(sentences) if i not in dropped)


def correct_description(caption: str, hallucinated: Callable[[str], bool]) -> str | None:
    """The caption without its hallucinating sentences (RLHF-V's fine-grained correction, done by rule).

    Sentences are split at ". "; a sentence is dropped when `hallucinated(sentence)` is true; a "shows N
    objects" count is lowered by the number of dropped sentences. Returns None when nothing is dropped or
    nothing but the count sentence would remain."""
    sentences = _sentences(caption)
    dropped = {i for i, s in enumerate(sentences) if hallucinated(s)}
    if not dropped or all(_COUNT.search(s) for i, s in enumerate(sentences) if i not in dropped):
        return None
    return _without(sentences, dropped)


def drop_true_sentences(caption: str, names_object: Callable[[str], bool], rng: random.Random,
                        k: int = 1) -> list[str]:
    """Up to k copies of the caption, each minus a different sentence that names an object (picked at random),
    count lowered; none when fewer than two such sentences are there to pick from (the shortened caption must
    still describe something)."""
    sentences = _sentences(caption)
    candidates = [i for i, s in enumerate(sentences) if names_object(s) and not _COUNT.search(s)]
    if len(candidates) < 2:
        return []
    return [_without(sentences, {i}) for i in rng.sample(candidates, min(k, len(candidates)))]


def corrected_pairs(answers: list[dict], sentences: list[dict], vocab, gt: dict, true_drops: int = 0,
                    seed: int = 0) -> list[dict]:
    """One pair per hallucinating sample: chosen = the sample with its hallucinating sentences removed
    (`correct_description`), rejected = the sample as the model wrote it.

    `true_drops` (k) adds, per such sample, up to k pairs that prefer the corrected description to the same
    minus one of its true sentences (`drop_true_sentences`, a different one each). Corrected pairs alone always
    prefer the shorter answer, and a policy trained on them learns to stop early (Recall falls with CHAIR); with
    one of each the shorter answer wins half the time, and what separates chosen from rejected is whether the
    sentence names an object the image has."""
    from mllm.eval.chair import resolve_image_id

    rng = random.Random(seed)
    pairs = []
    for answer, sentence in _aligned(answers, sentences):
        if not sentence["mscoco_hallucinated_words"]:
            continue
        truth = set(gt[resolve_image_id(sentence["image_id"], gt)])
        chosen = correct_description(answer["answer"], lambda s: bool(vocab.objects(s) - truth))
        if chosen is None:
            continue
        common = {"question": answer["question"], "image_path": answer["metainfos"]["image_path"]}
        pairs.append({"idx": len(pairs), **common, "chosen": chosen, "rejected": answer["answer"],
                      "metainfos": {"image_id": sentence["image_id"], "chosen_hallucinated": 0,
                                    "rejected_hallucinated": len(sentence["mscoco_hallucinated_words"]),
                                    "source": "corrected"}})
        for shortened in drop_true_sentences(chosen, lambda s: bool(vocab.objects(s)), rng, true_drops):
            pairs.append({"idx": len(pairs), **common, "chosen": chosen, "rejected": shortened,
                          "metainfos": {"image_id": sentence["image_id"], "chosen_hallucinated": 0,
                                        "rejected_hallucinated": 0, "source": "dropped_true"}})
    return pairs


# one object sentence of `scenes.detailed_description`, in either wording
_OBJECT_SENTENCE = re.compile(r"A (?P<size>[a-z-]+) (?P<colour>[a-z]+) (?P<name>[a-z]+) is (?P<place>[a-z ]+)\.|"
                              r"(?P<place1>[A-Z][a-z ]+?) there is an? (?P<size1>[a-z-]+) (?P<colour1>[a-z]+) "
                              r"(?P<name1>[a-z]+)\.")


def continue_correctly(caption: str, scene: dict) -> str | None:
    """The caption as written up to its first error, then the scene's objects it has not named yet, in raster
    order and in the caption's own wording (`scenes.detailed_description`'s variant); None when nothing is wrong.

    An error is a count sentence with the wrong number (then the whole description is the world's own), a sentence
    that is not an object sentence, one naming an object the scene has no more of (size, colour, shape and place
    all count: a repeat beyond the scene's count, a hallucination, a wrong place), or the end of the caption with
    objects left unnamed. Matching every word, the chosen side never teaches a wrong place or size, and one polish
    round from course13's base named more objects (Recall 66.3) than matching colour and shape alone (61.2). The
    corrected caption shares every token before the error with the caption, so that a pair of the two differs at
    the error alone (DPO's gradient falls there; the shared prefix cancels in the log-ratio)."""
    from mllm.world import scenes as S

    mentions = S.scene_mentions(S.scene_from_dict(scene), random.Random(0))  # canonical names, raster order
    sentences = _sentences(caption)
    variant = 1 if any(" there is " in sentence for sentence in sentences[1:]) else 0
    count_sentence = S.detailed_description(mentions, variant).split(". ")[0] + "."
    if not sentences or sentences[0] != count_sentence:
        whole = S.detailed_description(mentions, variant)
        return None if whole == caption.strip() else whole
    remaining, kept = list(mentions), [sentences[0]]
    for sentence in sentences[1:]:
        match = _OBJECT_SENTENCE.fullmatch(sentence)
        if match is None:
            break
        named = S.Mention(S.NAME_TO_CATEGORY.get(match.group("name") or match.group("name1"), ""),
                          match.group("colour") or match.group("colour1"), match.group("size") or match.group("size1"),
                          (match.group("place") or match.group("place1")).lower())
        if named not in remaining:
            break
        remaining.remove(named)
        kept.append(sentence)
    if not remaining and len(kept) == len(sentences):
        return None
    rest = S.detailed_description(remaining, variant).split(". ", 1)[1] if remaining else ""
    return " ".join(kept + ([rest] if rest else []))


def cut_at_error(chosen: str, rejected: str) -> tuple[str, bool]:
    """(the rejected text up to and including its first word that differs from the chosen one, whether that cut
    anything off). A rejected text that ends where the chosen one goes on is kept whole: its end is its error.

    Why: in a whole-text pair every rejected token after the error is pushed down too, the places and sizes of the
    sentences that follow included; course14's second polish round then wrote "... is in the image? answer in the
    image?" where a place should stand in 128 of 300 descriptions (stop 45). Cut, the rejected side holds the error
    alone, and the chosen side still teaches the whole correct continuation."""
    kept, written = chosen.split(" "), rejected.split(" ")
    at = next((i for i, (a, b) in enumerate(zip(kept, written)) if a != b), min(len(kept), len(written)))
    if at >= len(written):
        return rejected, False
    return " ".join(written[:at + 1]), at + 1 < len(written)


def continuation_pairs(answers: list[dict], scenes: dict[str, dict], cut: bool = False) -> list[dict]:
    """One pair per greedy description with an error: chosen = `continue_correctly`'s caption, rejected = the
    description as the model wrote it, or with `cut` that description up to its first wrong word (`cut_at_error`;
    `"rejected_open": true` where it stops inside the text, so that its end token is not scored). `answers` are
    `mllm answer` rows (metainfos with image_id and image_path), `scenes` the world's scene records by image_id."""
    pairs = []
    for answer in answers:
        image_id = answer["metainfos"]["image_id"]
        chosen = continue_correctly(answer["answer"], scenes[image_id])
        if chosen is None:
            continue
        rejected, opened = cut_at_error(chosen, answer["answer"]) if cut else (answer["answer"], False)
        pairs.append({"idx": len(pairs), "question": answer["question"], "chosen": chosen, "rejected": rejected,
                      "image_path": answer["metainfos"]["image_path"],
                      "metainfos": {"image_id": image_id, "source": "continuation"}}
                     | ({"rejected_open": True} if opened else {}))
    return pairs


# the word a hedge pair's chosen side names an unsure shape by: in the tokenizer's vocabulary ("The image shows two
# objects"), in no CHAIR synonym list, so such an object is described by its colour, size and place alone
HEDGE_WORD = "object"


def shape_words(caption: str) -> list[tuple[int, str, re.Match]]:
    """(word index in the caption, shape word, the sentence's match) of each object sentence, in order."""
    out, position = [], 0  # word index of the current sentence's start
    for sentence in _sentences(caption):
        match = _OBJECT_SENTENCE.fullmatch(sentence)
        words = sentence.split(" ")
        if match is not None:
            named = match.group("name") or match.group("name1")
            out.append((position + next(i for i, word in enumerate(words) if word.rstrip(".") == named), named, match))
        position += len(words)
    return out


def owned_shapes(caption: str, scene: dict) -> list[tuple[int, str, str | None]]:
    """(word index, shape word written, the true shape or None) of each object sentence, in order: the true shape is
    the category of the one object of the scene at the sentence's colour and place (None where there is none, or
    more than one). The sentence is that object's; its shape word is misnamed where the two differ (a hexagon for a
    circle, a diamond for a square)."""
    from mllm.world import scenes as S

    mentions = S.scene_mentions(S.scene_from_dict(scene), random.Random(0))
    out = []
    for at, named, match in shape_words(caption):
        colour = match.group("colour") or match.group("colour1")
        place = (match.group("place") or match.group("place1")).lower()
        owners = [m.name for m in mentions if m.colour == colour and m.place == place]
        out.append((at, named, owners[0] if len(owners) == 1 else None))
    return out


def correct_shapes(caption: str, scene: dict, hedge: str | None = None, unsure: Collection[int] = ()
                   ) -> tuple[str, str, bool] | None:
    """(the caption with every misnamed shape renamed (`owned_shapes`), the caption up to its first changed shape
    word, whether that word's shape is absent from the scene), or None when nothing changes. With `hedge` (a word:
    `HEDGE_WORD`) a misnamed shape becomes that word instead ("A large orange object is in the center."), and so
    does the shape word of each object sentence in `unsure` (indices of object sentences, in order), right or
    wrong. Where a misnamed shape is absent from the scene, CHAIR counts the word as a hallucination."""
    from mllm.world import scenes as S

    present = {o["category"] for o in scene["objects"]}
    written = caption.strip().split(" ")
    words, first, absent = list(written), None, False
    for k, (at, named, truth) in enumerate(owned_shapes(caption, scene)):
        category = S.NAME_TO_CATEGORY.get(named)
        misnamed = truth is not None and category is not None and truth != category
        if hedge is not None and (k in unsure or misnamed):
            name = hedge
        elif misnamed:
            name = truth
        else:
            continue
        words[at] = name + words[at][len(named):]
        if first is None:
            first, absent = at, category not in present
    if first is None:
        return None
    return " ".join(words), " ".join(written[:first + 1]), absent


def shape_pairs(answers: list[dict], scenes: dict[str, dict], hedge: str | None = None,
                unsure: list[Collection[int]] | None = None) -> list[dict]:
    """One pair per description with a misnamed shape or (`unsure`, one collection per answer) a shape to hedge
    (`correct_shapes`), one per distinct pair: chosen = the description with its shapes renamed or hedged, rejected =
    the description up to its first changed shape word (`"rejected_open": true`). The two share every token before
    it, so DPO's gradient falls on the shape word alone; the rest of the chosen side is the model's own text.
    `answers` and `scenes` as for `continuation_pairs`."""
    pairs, seen = [], set()
    for i, answer in enumerate(answers):
        image_id = answer["metainfos"]["image_id"]
        corrected = correct_shapes(answer["answer"], scenes[image_id], hedge, unsure[i] if unsure else ())
        if corrected is None or corrected[:2] in seen:
            continue
        seen.add(corrected[:2])
        pairs.append({"idx": len(pairs), "question": answer["question"], "chosen": corrected[0],
                      "rejected": corrected[1], "rejected_open": True,
                      "image_path": answer["metainfos"]["image_path"],
                      "metainfos": {"image_id": image_id, "source": "hedge" if hedge else "shape",
                                    "absent": corrected[2]}})
    return pairs


def named_shape_pairs(answers: list[dict], scenes: dict[str, dict], n: int,
                      unsure: list[Collection[int]] | None = None, hedge: str = HEDGE_WORD, seed: int = 0
                      ) -> list[dict]:
    """n pairs from greedy descriptions with no misnamed shape (`correct_shapes` changes nothing) and no shape to
    hedge (`unsure`, one collection per answer): chosen = the description, rejected = the description up to one of
    its shape words, that word replaced by `hedge` (`"rejected_open": true`). Beside hedge pairs they keep the shapes
    the model is sure of: hedge pairs for every misnamed shape alone taught the word everywhere (stop 48: 237 hedged
    objects in 300 descriptions, Recall 75.7 -> 67.2). The chosen side is the model's own text, other errors (a
    place, a size) included: its SFT term then teaches nothing the model does not already write."""
    rng = random.Random(seed)
    candidates = [(answer, [(at, named) for at, named, _ in shape_words(answer["answer"])])
                  for i, answer in enumerate(answers)
                  if not (unsure and unsure[i])
                  and correct_shapes(answer["answer"], scenes[answer["metainfos"]["image_id"]]) is None]
    candidates = [(answer, at) for answer, at in candidates if at]
    pairs = []
    for answer, places in rng.sample(candidates, min(n, len(candidates))):
        written = answer["answer"].strip().split(" ")
        at, named = rng.choice(places)
        rejected = " ".join(written[:at] + [hedge + written[at][len(named):]])  # as `correct_shapes` hedges
        pairs.append({"idx": len(pairs), "question": answer["question"], "chosen": answer["answer"].strip(),
                      "rejected": rejected, "rejected_open": True, "image_path": answer["metainfos"]["image_path"],
                      "metainfos": {"image_id": answer["metainfos"]["image_id"], "source": "named_shape"}})
    return pairs


def unsure_shapes(probs: list[list[dict[str, float]]], answers: list[dict], below: float) -> list[set[int]]:
    """Per answer, the object sentences whose shape word the model gave a probability below `below`
    (`mllm.course.shape_confidence.shape_word_probs`); none where the answer's shape words are not exactly its object
    sentences' (a shape word outside one: the two lists would not line up)."""
    out = []
    for p, answer in zip(probs, answers):
        words = shape_words(answer["answer"])
        out.append({k for k, ((_, named, _), dist) in enumerate(zip(words, p)) if dist.get(named, 0.0) < below}
                   if len(p) == len(words) else set())
    return out


def yesno_anchor_pairs(items: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n pairs from a world's yes/no training questions (`yesno_train.json`): chosen the true answer, rejected the
    other. Mixed among description pairs they keep the short answers a description-only run unlearns (measured:
    course13's base, 300 steps of continuation pairs: yes/no 0.808 -> 0.648 alone, -> 0.833 with a quarter
    of these among them)."""
    picked = random.Random(seed).sample(items, min(n, len(items)))
    pairs = []
    for item in picked:
        question, answer = (turn["content"] for turn in item["conversations"][:2])
        pairs.append({"idx": len(pairs), "question": question.replace("<image>", "").strip(), "chosen": answer,
                      "rejected": "No" if answer == "Yes" else "Yes", "image_path": item["image"],
                      "metainfos": {"image_id": item["id"], "source": "yesno_anchor"}})
    return pairs


def count_anchor_pairs(scenes: list[dict], n: int, seed: int = 0, several: float = 0.75) -> list[dict]:
    """n count questions about training scenes (`scenes.jsonl` records), the true answer chosen, each asking the
    scene's own count of one of its categories (answer Yes) or a wrong count (No, `wrong_count`), half each. With
    probability `several` the category is one the scene holds more than once, where it has one: polish's yes/no
    anchors, the world's questions of any kind, let its rounds take back what tune learnt there (course26: count
    questions about a category held twice, 27 -> 13 of 46 after one round)."""
    rng = random.Random(seed)
    train = [s for s in scenes if s.get("split") == "train" and s["objects"]]
    pairs = []
    for scene in (rng.choice(train) for _ in range(n if train else 0)):
        counts = Counter(obj["category"] for obj in scene["objects"])
        held = sorted(counts)
        many = [c for c in held if counts[c] > 1]
        category = rng.choice(many if many and rng.random() < several else held)
        asked_right = rng.random() < 0.5
        k = counts[category] if asked_right else wrong_count(counts[category], rng)
        chosen = "Yes" if asked_right else "No"
        pairs.append({"idx": len(pairs), "question": count_question(category, k) + YESNO_SUFFIX, "chosen": chosen,
                      "rejected": "No" if asked_right else "Yes", "image_path": scene["image"],
                      "metainfos": {"image_id": scene["image_id"], "source": "count_anchor", "held": counts[category]}})
    return pairs


def box_anchor_pairs(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n pairs from a world's referring expressions (`grounding_prepare.rec_conversations` records): chosen the
    true box, rejected the box of another object of the same image (images with one object give none). Among
    description pairs they keep the box answers: without them three rounds of `polish` took course13's base from
    grounding Acc@0.5 0.282 to 0.000, every answer a description."""
    boxes: dict[str, set[str]] = {}  # image -> the box answers of its objects
    for record in records:
        boxes.setdefault(record["image"], set()).add(record["conversations"][1]["content"])
    rng = random.Random(seed)
    candidates = [r for r in records if len(boxes[r["image"]]) > 1]
    pairs = []
    for record in rng.sample(candidates, min(n, len(candidates))):
        question, answer = (turn["content"] for turn in record["conversations"][:2])
        others = sorted(boxes[record["image"]] - {answer})
        pairs.append({"idx": len(pairs), "question": question.replace("<image>", "").strip(), "chosen": answer,
                      "rejected": rng.choice(others), "image_path": record["image"],
                      "metainfos": {"image_id": record["id"], "source": "box_anchor"}})
    return pairs


MODES = ("corrected", "balanced", "ranked", "continuation", "cut", "shape", "hedge")
# one greedy description per image, corrected; the others sample
GREEDY_MODES = ("continuation", "cut", "shape", "hedge")


def build_pairs(model_dir: str | Path, world: str | Path, out_dir: str | Path, n_images: int = 600,
                samples_per_image: int = 4, seed: int = 0, batch_size: int = 32, max_new_tokens: int = 160,
                mode: str = "balanced", true_drops: int = 1, yesno_anchors: float = 0.0, box_anchors: float = 0.0,
                count_anchors: float = 0.0, hedge_below: float = 0.0, named_shapes: float = 0.0, quiet: bool = True,
                runtime: dict | None = None) -> dict:
    """Describe the world's training images with `model_dir` and pair the descriptions: mode "corrected" or
    "balanced" (sampled, `corrected_pairs`, the latter with `true_drops`), "ranked" (sampled, `rank_pairs`) or
    "continuation" (one greedy description per image, `continuation_pairs`) or "cut" (the same, the rejected side cut
    after its first wrong word) or "shape" (one greedy description per image, its misnamed shapes renamed,
    `shape_pairs`) or "hedge" (the same, each misnamed shape and each shape word the model wrote with a probability
    below `hedge_below` called `HEDGE_WORD`, with `named_shapes` pairs per such pair that keep a sure, right shape
    against the hedge word, `named_shape_pairs`). `yesno_anchors`, `count_anchors` and `box_anchors` add that many
    yes/no, count and grounding pairs per description pair (`yesno_anchor_pairs`, `count_anchor_pairs`,
    `box_anchor_pairs`: the world's yes/no training questions, count questions about its scenes, its referring
    expressions).

    Writes out_dir/{questions.jsonl, samples.jsonl, pairs.json, pairs_summary.json}; an interrupted run resumes
    its decoding (samples.jsonl is appended by `mllm answer`). Returns the summary."""
    import torch

    from mllm.eval import chair
    from mllm.eval.answer import run

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    world, out_dir = Path(world), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scenes = [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines() if line.strip()]
    greedy = mode in GREEDY_MODES
    questions = _questions(scenes, n_images, 1, seed) if greedy else sample_questions(scenes, n_images,
                                                                                     samples_per_image, seed)
    question_file = out_dir / "questions.jsonl"
    text = "".join(json.dumps(q) + "\n" for q in questions)
    if not question_file.is_file() or question_file.read_text() != text:
        question_file.write_text(text)
        (out_dir / "samples.jsonl").unlink(missing_ok=True)  # answers to other questions must not be reused
    torch.manual_seed(seed)
    run(str(model_dir), question_file, out_dir / "samples.jsonl", decoding="greedy" if greedy else "sample",
        batch_size=batch_size, max_new_tokens=max_new_tokens, image_root=world, quiet=quiet,
        on_other_run="recompute", **(runtime or {}))
    answers = sorted((json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()),
                     key=lambda row: row["idx"])
    vocab, gt = chair.load_chair_gt(world / "chair_gt.json")
    scored = chair.score([{"image_id": a["metainfos"]["image_id"], "caption": a["answer"]} for a in answers],
                         gt, vocab)
    if scored["skipped"]:  # empty samples: drop them from both lists so the two stay aligned
        empty = {s["index"] for s in scored["skipped"]}
        answers = [a for i, a in enumerate(answers) if i not in empty]
    if mode == "ranked":
        pairs = rank_pairs(answers, scored["sentences"])
    elif mode in ("shape", "hedge"):
        by_id = {scene["image_id"]: scene for scene in scenes}
        unsure = None
        if mode == "hedge" and hedge_below > 0:
            from mllm.course.shape_confidence import shape_word_probs

            probs = shape_word_probs(model_dir, answers, world, progress=not quiet)
            unsure = unsure_shapes(probs, answers, hedge_below)
        pairs = shape_pairs(answers, by_id, HEDGE_WORD if mode == "hedge" else None, unsure)
        if mode == "hedge":
            pairs += named_shape_pairs(answers, by_id, round(named_shapes * len(pairs)), unsure, seed=seed)
    elif greedy:
        pairs = continuation_pairs(answers, {scene["image_id"]: scene for scene in scenes}, cut=mode == "cut")
    else:
        pairs = corrected_pairs(answers, scored["sentences"], vocab, gt,
                                true_drops=0 if mode == "corrected" else true_drops, seed=seed)
    described = len(pairs)
    if round(yesno_anchors * described):
        pairs += yesno_anchor_pairs(json.loads((world / "yesno_train.json").read_text()),
                                    round(yesno_anchors * described), seed)
    if round(count_anchors * described):
        pairs += count_anchor_pairs(scenes, round(count_anchors * described), seed)
    if round(box_anchors * described):
        from mllm.data.grounding_prepare import rec_conversations

        pairs += box_anchor_pairs(rec_conversations(world / "rec_train.jsonl"), round(box_anchors * described), seed)
    if mode != "ranked" or len(pairs) > described:
        random.Random(seed).shuffle(pairs)  # one image's pairs are adjacent; a batch should mix images and kinds
    for index, pair in enumerate(pairs):
        pair["idx"] = index
    write_json_atomic(out_dir / "pairs.json", pairs)
    summary = {"mode": mode, "images": len({a["metainfos"]["image_id"] for a in answers}), "samples": len(answers),
               "pairs": len(pairs), "samples_metrics": scored["overall_metrics"],
               "chosen_hallucinated_mean": _mean(p["metainfos"].get("chosen_hallucinated", 0) for p in pairs),
               "rejected_hallucinated_mean": _mean(p["metainfos"].get("rejected_hallucinated", 0) for p in pairs),
               "model": str(model_dir), "pairs_file": str(out_dir / "pairs.json")}
    write_json_atomic(out_dir / "pairs_summary.json", summary)
    return summary


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
