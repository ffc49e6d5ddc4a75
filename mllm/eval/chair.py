"""CHAIR object-hallucination metrics (Rohrbach et al., 2018), rule-based as in the THUNLP exercise.

Pipeline for one caption (eval_facts §1.2): lowercase -> Treebank-like tokens -> singularize each token ->
merge multi-word phrases left to right (`Vocabulary.double_words`) -> drop "seat" when "toilet" is present ->
keep tokens that are synonyms -> map each to its canonical "node word".

Metrics (the exercise's variant, eval_facts §1.5), reported as raw fractions in JSON and x100 when printed:
- CHAIRs = captions with >= 1 hallucinated mention / all scored captions.
- CHAIRi = hallucinated mentions / all object mentions, pooled over the corpus, every occurrence counted.
- Recall = sum over captions of distinct GT classes mentioned / sum of GT class counts (micro-averaged).
- Len    = mean number of tokens per caption after phrase merging, punctuation included (not scaled).

COCO vocabularies (`Vocabulary.coco(name)`, CLI `--vocabulary`):
- "original" (default): the original CHAIR's synonym list and double-word rules word for word, quirks included
  (`mllm.eval.coco_vocab_original`), matched literally as its code does, so numbers compare with published ones.
- "mllm": this project's revised table (`mllm.eval.coco_vocab`, whose docstring lists every difference).
- Remaining difference from the original code under "original": tokens come from the regex tokenizer and the
  rule-based singularizer below, not nltk `word_tokenize` + pattern's `singularize` (nor the exercise's WordNet
  lemmatiser). Entries our singularizer never produces ("skis", "oxen", "children", "people", the phrase
  "sports ball") never match as written, but a singular on the same line does ("ski", "ox", "child", "person",
  "ball"), so no class is lost; "wine glass" merges directly where pattern needed the "wine glas" rule.

Design choices:
- No nltk / pattern dependency: a small regex tokenizer and a rule-based singularizer (like
  pattern.en.singularize, so "men" -> "man", unlike WordNet which keeps "men"). Normalized tables (not the
  literal "original" one) pass through the same normalisation, so such a table may list "skis" or "ski".
- Unknown image ids raise `UnknownImageIdError` listing them (the exercise's pickle silently scores them as
  all-hallucinated); empty captions are skipped and listed under `skipped`, never scored silently.
- Ground truth comes from a `chair_gt.json` file (synthetic world), COCO annotations (built once and cached as
  JSON in the same format), or an existing `chair_300.pkl` read by a restricted unpickler (`--trust-pickle`).
- `hallucination_idxs` index into the record's `words` (the merged token list), so they stay aligned.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import copyreg
import hashlib
import json
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mllm.eval.coco_vocab import COCO_DOUBLE_WORDS, COCO_SYNONYMS
from mllm.eval.coco_vocab_original import ORIGINAL_DOUBLE_WORDS, ORIGINAL_SYNONYMS
from mllm.jsonio import read_jsonl, write_json_atomic

# ----------------------------------------------------------------------------------------------- text

_TOKEN_RE = re.compile(
    r"""
      [a-z]+(?=n't\b)              # "do" of "don't": Treebank splits off n't ("can't" -> "ca", "n't")
    | n't\b
    | '(?:s|re|ve|ll|d|m)\b        # clitics 's 're 've 'll 'd 'm
    | \d+(?:[.,:/]\d+)+            # numbers with separators: 3.5  1,000  10:30  1/2
    | [^\W_]+(?:-[^\W_]+)*         # words and hyphenated words (t-shirt)
    | \.\.\.|--                    # ellipsis, dash
    | \S                           # any other punctuation character is its own token
    """,
    re.VERBOSE,
)


def tokenize(text: str) -> list[str]:
    """Lowercased Treebank-like tokens: words, numbers and punctuation marks are separate tokens."""
    return _TOKEN_RE.findall(text.lower().replace("\u2019", "'").replace("\u2018", "'"))


_IRREGULAR_SINGULARS = {
    "men": "man", "women": "woman", "people": "person", "children": "child", "mice": "mouse", "lice": "louse",
    "geese": "goose", "feet": "foot", "teeth": "tooth", "oxen": "ox", "dice": "die",
    "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf", "shelves": "shelf", "wolves": "wolf",
    "calves": "calf", "halves": "half", "loaves": "loaf", "scarves": "scarf", "thieves": "thief",
    "hooves": "hoof", "elves": "elf", "selves": "self",
    "buses": "bus", "viruses": "virus", "bonuses": "bonus", "campuses": "campus", "cactuses": "cactus",
    "octopuses": "octopus", "walruses": "walrus", "circuses": "circus", "statuses": "status",
    "gases": "gas", "lenses": "lens", "canvases": "canvas", "atlases": "atlas", "quizzes": "quiz", "axes": "axe",
    "potatoes": "potato", "tomatoes": "tomato", "heroes": "hero", "echoes": "echo", "volcanoes": "volcano",
    "mangoes": "mango", "buffaloes": "buffalo", "mosquitoes": "mosquito", "dominoes": "domino",
    "torpedoes": "torpedo", "cacti": "cactus", "fungi": "fungus", "indices": "index", "matrices": "matrix",
    "vertices": "vertex", "criteria": "criterion", "phenomena": "phenomenon", "analyses": "analysis",
    "crises": "crisis",
}
# words ending in -s that are not plurals (or have no singular); short words (<= 3 letters) are kept as well
_UNCHANGED = {
    "series", "species", "news", "scissors", "pants", "jeans", "shorts", "trousers", "clothes", "sunglasses",
    "goggles", "binoculars", "pliers", "tongs", "chess", "billiards", "physics", "mathematics", "gymnastics",
    "athletics", "politics", "electronics", "always", "perhaps", "towards", "afterwards", "besides",
    "sometimes", "upstairs", "downstairs", "indoors", "outdoors", "whereas", "unless", "across", "thus",
    "plus", "yes", "gas", "christmas", "canvas", "atlas", "alias", "bias", "pancreas", "lens", "does",
}
_MEN_NOT_PLURAL = {"amen", "omen", "specimen", "abdomen", "stamen", "semen", "regimen", "hymen", "ramen",
                   "dolmen", "lumen", "cyclamen", "albumen"}
_IE_SINGULARS = {
    "movie", "cookie", "zombie", "hippie", "rookie", "brownie", "smoothie", "calorie", "selfie", "goalie",
    "collie", "yorkie", "aussie", "beanie", "hoodie", "necktie", "bowtie", "sweetie", "genie", "prairie",
    "birdie", "budgie", "pixie", "veggie", "magpie", "auntie", "bootie", "cutie", "doggie", "boogie", "lassie",
}
# plurals of nouns ending in -i or -u, which the "-is"/"-us" words-are-singular rule would otherwise keep
_I_U_PLURALS = {"skis", "kiwis", "taxis", "bikinis", "martinis", "zucchinis", "salamis", "safaris", "yetis",
                "khakis", "alibis", "rabbis", "chilis", "tikis", "menus", "emus", "gnus", "tutus", "haikus", "gurus"}
_CHE_SINGULARS = {"headache", "mustache", "moustache", "niche", "avalanche", "cache", "cliche", "quiche",
                  "creche", "psyche", "ache", "stomachache", "toothache"}


def singularize(word: str) -> str:
    """Singular form of a lowercased English noun by rule (plural-looking non-nouns may change harmlessly)."""
    if word in _IRREGULAR_SINGULARS:
        return _IRREGULAR_SINGULARS[word]
    if word.endswith("men") and len(word) > 3 and word not in _MEN_NOT_PLURAL:
        return word[:-3] + "man"  # policemen, firemen, sportsmen
    if word in _I_U_PLURALS:
        return word[:-1]
    if len(word) <= 3 or word in _UNCHANGED or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        if len(word) <= 4 or word[:-1] in _IE_SINGULARS:
            return word[:-1]  # ties, pies, cookies, doggies
        return word[:-3] + "y"  # puppies, ponies, berries
    if word.endswith(("sses", "shes", "xes", "zzes")):
        return word[:-2]  # glasses, dishes, boxes, buzzes
    if word.endswith("ches"):
        return word[:-1] if word[:-1] in _CHE_SINGULARS else word[:-2]  # benches; headaches
    return word[:-1]  # cats, skis, horses, gloves, shoes (irregular -ves/-oes/-uses are in the table)


def normalize_phrase(phrase: str) -> str:
    """A synonym or phrase in caption form: tokenized, singularized, joined by single spaces."""
    return " ".join(singularize(t) for t in tokenize(phrase))


# ----------------------------------------------------------------------------------------- vocabulary


COCO_VOCABULARIES = ("original", "mllm")  # names for `Vocabulary.coco`; the first is the default


@dataclass
class Vocabulary:
    """Object classes for CHAIR: canonical node word -> synonyms, plus multi-word merge rules.

    Two ways of matching a caption against the tables:
    - normalized (default; the `mllm` COCO table and synthetic worlds): synonyms are tokenized and singularized like
      captions, every multi-word synonym merges, and merges of any length are matched longest first.
    - literal (`literal=True`; the `original` COCO table): the original CHAIR code's matching. Entries are compared
      exactly as written, so " motor bike" and "iPhone" never match; only `double_words` merge, and only as pairs of
      adjacent tokens, their result kept as written ("wine glas" -> "wine glass").
    `name` labels the tables in results; it is not part of the fingerprint.
    """

    synonyms: dict[str, list[str]]
    double_words: dict[str, str] = field(default_factory=dict)
    literal: bool = False
    name: str = "custom"

    def __post_init__(self) -> None:
        key_of = (lambda word: word) if self.literal else normalize_phrase
        self.node_of: dict[str, str] = {}  # synonym (normalized unless literal) -> canonical node word
        for canonical, words in self.synonyms.items():
            for word in [canonical, *words]:
                key = key_of(word)
                if not key:
                    continue
                if self.node_of.get(key, canonical) != canonical:
                    raise ValueError(f"synonym {word!r} belongs to both {self.node_of[key]!r} and {canonical!r}")
                self.node_of[key] = canonical
        self.merges: dict[tuple[str, ...], str] = {}  # token run -> merged token
        if not self.literal:
            for key in self.node_of:  # every multi-word synonym is one token
                if " " in key:
                    self.merges[tuple(key.split(" "))] = key
        for phrase, merged in self.double_words.items():  # explicit rules win
            self.merges[tuple(key_of(phrase).split(" "))] = key_of(merged)
        # the original looks at pairs only, so its three-word "stove top oven" never merges
        self.longest_merge = 2 if self.literal else max((len(k) for k in self.merges), default=1)

    @classmethod
    def coco(cls, name: str = "original") -> Vocabulary:
        """The COCO 80-category tables by name: "original" (the CHAIR paper's, matched literally) or "mllm"."""
        if name == "original":
            return cls(ORIGINAL_SYNONYMS, ORIGINAL_DOUBLE_WORDS, literal=True, name="original")
        if name == "mllm":
            return cls(COCO_SYNONYMS, COCO_DOUBLE_WORDS, name="mllm")
        raise ValueError(f"unknown COCO vocabulary {name!r}; choose one of {', '.join(COCO_VOCABULARIES)}")

    @classmethod
    def from_chair_gt(cls, path: str | Path) -> Vocabulary:
        return _vocabulary_of_document(json.loads(Path(path).read_text()), Path(path).name)

    def node_of_phrase(self, phrase: str) -> str | None:
        """Node word of a whole phrase such as a COCO category name, looked up the way this vocabulary matches."""
        return self.node_of.get(phrase if self.literal else normalize_phrase(phrase))

    def fingerprint(self) -> str:
        """Hash of the tables: a GT cache built with other tables must be rebuilt."""
        # "literal" only when set, so caches of normalized tables written before the flag existed stay valid
        tables = [self.synonyms, self.double_words] + (["literal"] if self.literal else [])
        blob = json.dumps(tables, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def merge_phrases(self, tokens: list[str]) -> list[str]:
        """Left-to-right longest-match merge of multi-word phrases ("teddy bear", "baby elephant" -> elephant)."""
        merged, i = [], 0
        while i < len(tokens):
            for n in range(min(self.longest_merge, len(tokens) - i), 1, -1):
                run = tuple(tokens[i:i + n])
                if run in self.merges:
                    merged.append(self.merges[run])
                    i += n
                    break
            else:
                merged.append(tokens[i])
                i += 1
        return merged

    def parse(self, caption: str) -> tuple[list[str], list[tuple[int, str, str]]]:
        """(words, mentions): merged tokens and one (index into words, word, node word) per object mention."""
        words = self.merge_phrases([singularize(t) for t in tokenize(caption)])
        skip_seat = "toilet" in words and "seat" in words  # a toilet seat is not a chair
        mentions = [(i, w, self.node_of[w]) for i, w in enumerate(words)
                    if w in self.node_of and not (skip_seat and w == "seat")]
        return words, mentions

    def objects(self, caption: str) -> set[str]:
        return {node for _, _, node in self.parse(caption)[1]}


# ------------------------------------------------------------------------------------------ image ids

_COCO_FILE_NAME = re.compile(r"^COCO_(?:train|val|test)\d{4}_0*(\d+)\.(?:jpg|jpeg|png)$")


class UnknownImageIdError(ValueError):
    """Some captions name images that have no ground truth."""


def resolve_image_id(raw: Any, gt: dict) -> Any:
    """The key of `gt` that `raw` names (as is, as str, as int, or from "COCO_val2014_000000000042.jpg")."""
    candidates = [raw, str(raw)]
    if isinstance(raw, str):
        match = _COCO_FILE_NAME.match(raw.strip())
        digits = match.group(1) if match else raw.strip()
        if digits.isdigit():
            candidates.append(int(digits))
    for candidate in candidates:
        if candidate in gt:
            return candidate
    return None


def image_id_of(record: dict, key: str = "image_id") -> Any:
    """The image id at the top level of an answers record, else under its `metainfos`."""
    if record.get(key) is not None:
        return record[key]
    return (record.get("metainfos") or {}).get(key)


# --------------------------------------------------------------------------------------------- score


def score(captions: list[dict], gt: dict[Any, list[str]], vocab: Vocabulary) -> dict:
    """CHAIRs/CHAIRi/Recall/Len of `captions` ([{image_id, caption}]) against `gt` (image id -> node words)."""
    keys = [resolve_image_id(c["image_id"], gt) for c in captions]
    unknown = [c["image_id"] for c, k in zip(captions, keys) if k is None]
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:20])
        raise UnknownImageIdError(f"{len(unknown)} caption(s) name images without ground truth: {shown}"
                                  + (" ..." if len(unknown) > 20 else ""))
    sentences, skipped = [], []
    n_hallucinated_captions = n_mentions = n_hallucinated_mentions = n_gt = n_recalled = n_tokens = 0
    for index, (record, key) in enumerate(zip(captions, keys)):
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            reason = "empty caption" if isinstance(caption, str) or caption is None else "caption is not a string"
            skipped.append({"index": index, "image_id": record["image_id"], "reason": reason})
            continue
        gt_objects = set(gt[key])
        words, mentions = vocab.parse(caption)
        hallucinated = [(w, node) for _, w, node in mentions if node not in gt_objects]
        recalled = {node for _, _, node in mentions if node in gt_objects}
        n_hallucinated_captions += bool(hallucinated)
        n_mentions += len(mentions)
        n_hallucinated_mentions += len(hallucinated)
        n_gt += len(gt_objects)
        n_recalled += len(recalled)
        n_tokens += len(words)
        sentences.append({
            "image_id": record["image_id"],
            "caption": caption,
            "mscoco_hallucinated_words": [list(pair) for pair in hallucinated],
            "mscoco_gt_words": sorted(gt_objects),
            "mscoco_generated_words": [node for _, _, node in mentions],
            "hallucination_idxs": [i for i, _, node in mentions if node not in gt_objects],
            "words": words,
            "metrics": {
                "CHAIRs": int(bool(hallucinated)),
                "CHAIRi": len(hallucinated) / len(mentions) if mentions else 0.0,
                "Recall": len(recalled) / len(gt_objects) if gt_objects else 0.0,
                "Len": len(words),
            },
        })
    n = len(sentences)
    if n == 0:
        raise ValueError(f"no caption to score ({len(skipped)} skipped)")
    return {
        "overall_metrics": {
            "CHAIRs": n_hallucinated_captions / n,
            "CHAIRi": n_hallucinated_mentions / n_mentions if n_mentions else 0.0,
            "Recall": n_recalled / n_gt if n_gt else 0.0,
            "Len": n_tokens / n,
        },
        "counts": {
            "captions": n, "hallucinated_captions": n_hallucinated_captions, "mentions": n_mentions,
            "hallucinated_mentions": n_hallucinated_mentions, "gt_objects": n_gt, "recalled_gt_objects": n_recalled,
            "tokens": n_tokens, "skipped": len(skipped),
        },
        "variant": "rule-based CHAIR; CHAIRs over all scored captions; every mention counted; "
                   "Len = tokens after phrase merging, punctuation included",
        "vocabulary": vocab.name,
        "skipped": skipped,
        "sentences": sentences,
    }


def paired_change(before: list[dict], after: list[dict], draws: int = 2000, seed: int = 0) -> dict:
    """Relative change of CHAIRs and CHAIRi from `before` to `after` (two `score()` "sentences" lists of the same
    images), each with a paired bootstrap's 5 and 95 percentiles: images are drawn with replacement and both
    models' captions of a drawn image go together. On a bench of a few hundred images at CHAIRs of a few percent a
    handful of captions decides a -20 % change; the interval says whether the bench can tell.

    Returns {"CHAIRs": (change, low, high), "CHAIRi": (...)}, changes as fractions (-0.25 = a quarter fewer)."""
    ids = [s["image_id"] for s in before]
    if ids != [s["image_id"] for s in after]:
        raise ValueError("paired_change needs the two models' captions of the same images in the same order")

    def counts(sentences) -> np.ndarray:  # (images, 3): hallucinating caption, hallucinated mentions, mentions
        return np.array([(bool(s["mscoco_hallucinated_words"]), len(s["mscoco_hallucinated_words"]),
                          len(s["mscoco_generated_words"])) for s in sentences], dtype=np.float64).reshape(-1, 3)

    def rates(totals: np.ndarray, images: int) -> np.ndarray:  # (..., 3) sums -> (..., 2): CHAIRs, CHAIRi
        mentions = totals[..., 2]
        chair_i = np.divide(totals[..., 1], mentions, out=np.zeros_like(mentions), where=mentions > 0)
        return np.stack([totals[..., 0] / images, chair_i], -1)

    def change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, b / np.where(a > 0, a, 1) - 1, np.where(b > 0, np.inf, 0.0))

    a_rows, b_rows, n = counts(before), counts(after), len(ids)
    point = change(rates(a_rows.sum(0), n), rates(b_rows.sum(0), n))
    picked = np.random.default_rng(seed).integers(0, n, size=(draws, n))  # (draws, images)
    drawn = change(rates(a_rows[picked].sum(1), n), rates(b_rows[picked].sum(1), n))  # (draws, 2)
    bounds = np.percentile(drawn, [5, 95], axis=0, method="nearest")  # (2, 2); inf where a draw had none before
    return {name: (float(point[k]), float(bounds[0, k]), float(bounds[1, k]))
            for k, name in enumerate(("CHAIRs", "CHAIRi"))}


# ------------------------------------------------------------------------------------- ground truth

COCO_ANNOTATION_FILES = ("instances_train2014.json", "instances_val2014.json",
                         "captions_train2014.json", "captions_val2014.json")


def _images_from_json(images: dict[str, list[str]]) -> dict[Any, list[str]]:
    """JSON object keys are strings; all-digit ones are COCO ids and become ints again."""
    return {int(k) if k.isdigit() else k: list(v) for k, v in images.items()}


def _vocabulary_of_document(data: dict, file_name: str) -> Vocabulary:
    """The tables of a `chair_gt.json`; a synthetic world's file has no `literal`/`vocabulary_name` keys."""
    return Vocabulary(data["vocabulary"], data.get("double_words", {}), literal=bool(data.get("literal", False)),
                      name=data.get("vocabulary_name") or file_name)


def load_chair_gt(path: str | Path) -> tuple[Vocabulary, dict[Any, list[str]]]:
    """Vocabulary and image id -> objects from a `chair_gt.json` (also the format of every cache written here)."""
    data = json.loads(Path(path).read_text())
    return _vocabulary_of_document(data, Path(path).name), _images_from_json(data["images"])


def _chair_gt_document(vocab: Vocabulary, images: dict[Any, set | list], source: str) -> dict:
    return {"source": source, "vocabulary_name": vocab.name, "vocabulary_fingerprint": vocab.fingerprint(),
            "literal": vocab.literal, "vocabulary": vocab.synonyms, "double_words": vocab.double_words,
            "images": {str(k): sorted(v) for k, v in images.items()}}


def build_coco_gt(annotations_dir: str | Path, vocab: Vocabulary | None = None,
                  cache: str | Path | None = None, vocabulary: str = "original") -> dict[int, list[str]]:
    """COCO 2014 train+val image id -> node words of its instance categories and of objects in its captions.

    `vocab` defaults to `Vocabulary.coco(vocabulary)`; the ground truth depends on it (caption objects)."""
    vocab = vocab or Vocabulary.coco(vocabulary)
    if cache is not None and Path(cache).exists():
        data = json.loads(Path(cache).read_text())
        if data.get("vocabulary_fingerprint") == vocab.fingerprint():
            return _images_from_json(data["images"])
        print(f"chair: {cache} was built with other synonym tables; rebuilding", file=sys.stderr)
    annotations_dir = Path(annotations_dir)
    missing = [name for name in COCO_ANNOTATION_FILES if not (annotations_dir / name).exists()]
    if missing:
        raise FileNotFoundError(f"missing COCO annotation file(s) in {annotations_dir}: {', '.join(missing)} "
                                "(from annotations_trainval2014.zip)")
    from pycocotools.coco import COCO

    objects: dict[int, set[str]] = collections.defaultdict(set)
    for name in COCO_ANNOTATION_FILES:
        with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints progress
            coco = COCO(str(annotations_dir / name))
        for image_id in coco.getImgIds():
            objects[image_id]  # noqa: B018  (an image with no objects still has ground truth: the empty set)
        if name.startswith("instances"):
            category_names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
            for ann in coco.dataset["annotations"]:
                node = vocab.node_of_phrase(category_names[ann["category_id"]])
                if node is None:
                    raise ValueError(f"COCO category {category_names[ann['category_id']]!r} is not in the vocabulary")
                objects[ann["image_id"]].add(node)
        else:
            for ann in coco.dataset["annotations"]:
                objects[ann["image_id"]] |= vocab.objects(ann["caption"])
    if cache is not None:
        write_json_atomic(cache, _chair_gt_document(vocab, objects, f"coco annotations in {annotations_dir}"))
    return {k: sorted(v) for k, v in objects.items()}


class PickledChairState:
    """Plain attribute holder that stands in for the exercise's `__main__.CHAIR` class when unpickling."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and the CHAIR attribute holder; any other global is refused."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("builtins", name): getattr(builtins, name)
        for name in ("set", "frozenset", "dict", "list", "tuple", "str", "int", "float", "bool", "object")
    }
    _ALLOWED[("collections", "defaultdict")] = collections.defaultdict
    _ALLOWED[("collections", "OrderedDict")] = collections.OrderedDict
    _ALLOWED[("copyreg", "_reconstructor")] = copyreg._reconstructor  # instances pickled with protocol 0/1

    def find_class(self, module: str, name: str) -> Any:
        if name == "CHAIR":
            return PickledChairState
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol 0-2 names
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")


def load_chair_pickle(path: str | Path, trust_pickle: bool = False) -> dict[int, list[str]]:
    """image id -> objects from the exercise's `chair_300.pkl` (a pickled CHAIR instance), restricted unpickling."""
    if not trust_pickle:
        raise PermissionError(f"refusing to read pickle {path}: pickles can run code; pass --trust-pickle if "
                              "you trust its source (it is then read by a restricted unpickler)")
    with open(path, "rb") as f:
        state = RestrictedUnpickler(f).load()
    imid_to_objects = state.get("imid_to_objects") if isinstance(state, dict) else \
        getattr(state, "imid_to_objects", None)
    if not isinstance(imid_to_objects, dict):
        raise ValueError(f"{path} holds no `imid_to_objects` mapping")
    return {int(k): sorted(v) for k, v in imid_to_objects.items()}


def convert_chair_pickle(pkl_path: str | Path, out_json: str | Path, trust_pickle: bool = False,
                         vocabulary: str = "original") -> dict[int, list[str]]:
    """Write the pickle's ground truth as a COCO-vocabulary `chair_gt.json`; returns image id -> objects.

    The pickle's objects were found with the tables frozen inside it (the original's, for the exercise's file);
    `vocabulary` names the tables stored next to them, which then score captions."""
    images = load_chair_pickle(pkl_path, trust_pickle)
    vocab = Vocabulary.coco(vocabulary)
    foreign = sorted({o for objs in images.values() for o in objs} - set(vocab.synonyms))
    if foreign:
        print(f"chair: warning: pickle objects outside the COCO vocabulary: {foreign[:10]}", file=sys.stderr)
    write_json_atomic(out_json, _chair_gt_document(vocab, images, f"converted from {pkl_path}"))
    return images


# ----------------------------------------------------------------------------------------------- CLI


def read_answers(path: str | Path) -> tuple[list[tuple[int, dict]], list[dict]]:
    """(line number, record) pairs from a jsonl (or a JSON list) file, and one skip entry per malformed line."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return list(enumerate(json.loads(text), start=1)), []
    numbered, bad = read_jsonl(path)
    records = []
    for line_no, record in numbered:
        if isinstance(record, dict):
            records.append((line_no, record))
        else:
            bad.append({"line": line_no, "reason": "not a JSON object"})
    return records, bad


def format_table(result: dict) -> str:
    m, c = result["overall_metrics"], result["counts"]
    return (f"CHAIR  vocabulary={result.get('vocabulary', 'custom')}  captions={c['captions']}  "
            f"skipped={c['skipped']}  mentions={c['mentions']}\n"
            f"{'CHAIRs':>8}{'CHAIRi':>8}{'Recall':>8}{'Len':>8}\n"
            f"{100 * m['CHAIRs']:>8.1f}{100 * m['CHAIRi']:>8.1f}{100 * m['Recall']:>8.1f}{m['Len']:>8.1f}")
