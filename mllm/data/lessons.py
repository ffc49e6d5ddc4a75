"""The base model's lessons: conversations about fresh scenes, drawn from a weighted mix of turn makers.

The base is trained on an unbounded stream of scenes (no fixed training set: a 4-layer LLM memorises a few
thousand scenes long before it learns to look things up). Each conversation is several turns about one scene:

    statements    "Which of these are in the image?" -> "a circle yes , a blue star no , two rings no , ..."
                  dense lookups shaped like the yes/no questions, each followed by whether it holds; it
                  supervises at every statement the hop a yes/no question needs (find the named object in the
                  image) that a single Yes/No token supervises once.
    yes/no        one question of the exercise's yes/no pairs (existence, colour, count, position)
    lookup        an open question whose answer is one looked-up attribute (colour, place, count)
    short, detailed   the world's descriptions; with `caption_noise`, one absent object is added to a share of
                  them, as in the world's training files (so a model trained on them hallucinates a little)
    grounding     the exercise's grounding prompt -> the object's box on the 0-1000 grid
    box list      every uniquely describable object with its box (a dense grounding turn)

Order matters more than the mix: a turn that asks about the scene must never follow a turn that writes the
scene out, or the model learns to copy the answer from the earlier text instead of looking at the image. With
the statements first, yes/no questions after them were learnt and then lost on held-out single questions (.975
-> .53-.57 while the training loss fell); with descriptions before the statements, a fresh LLM stayed at chance
for 500 steps. So every conversation is ordered: the asking turns (yes/no, lookup), then the statements, then
the writing turns (descriptions, grounding).

Everything is a pure function of a `random.Random`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from mllm.data.boxes import format_box, pixel_to_grid
from mllm.data.grounding_prepare import GROUNDING_PROMPT
from mllm.world import scenes as S

Turn = tuple[str, str]


def statements(scene: S.Scene, rng: random.Random) -> Turn:
    """Up to 2 present and 2 absent categories, 2 (colour, category) pairs with a wrong colour each, 2 right and
    wrong counts and 2 right and far places, shuffled; each followed by "yes" or "no"."""
    counts = S._counts(scene)
    absent = [c for c in S.CATEGORIES if c not in counts]
    items = [f"a {cat} yes" for cat in rng.sample(sorted(counts), min(2, len(counts)))]
    items += [f"a {cat} no" for cat in rng.sample(absent, min(2, len(absent)))]
    for obj in rng.sample(scene.objects, min(2, len(scene.objects))):
        used = {x.colour for x in scene.objects if x.category == obj.category}
        other = [c for c in S.COLOURS if c not in used]
        items.append(f"a {obj.colour} {obj.category} yes")
        if other:
            items.append(f"a {rng.choice(other)} {obj.category} no")
    for cat in rng.sample(sorted(counts), min(2, len(counts))):
        right = counts[cat]
        wrong = right + 1 if right == 1 or rng.random() < 0.5 else right - 1
        items += [f"{S.number_phrase(right, cat)} yes", f"{S.number_phrase(wrong, cat)} no"]
    uniques = S._unique_colour_category(scene)
    for obj in rng.sample(uniques, min(2, len(uniques))):
        row, col = S.grid_cell(obj, scene.width, scene.height)
        far = rng.choice([cell for cell in S.CELL_PHRASES if cell[0] != row and cell[1] != col])
        items += [f"the {obj.colour} {obj.category} {S.CELL_PHRASES[(row, col)]} yes",
                  f"the {obj.colour} {obj.category} {S.CELL_PHRASES[far]} no"]
    rng.shuffle(items)
    return "Which of these are in the image?", " " + " , ".join(items) + " ."


def inventory(scene: S.Scene, rng: random.Random) -> Turn:
    """Every category in random order, each followed by whether the scene holds it: the existence curriculum's
    dense turn."""
    counts = S._counts(scene)
    categories = list(S.CATEGORIES)
    rng.shuffle(categories)
    return "Which shapes are in the image?", " " + " , ".join(f"{c} {'yes' if c in counts else 'no'}"
                                                             for c in categories) + " ."


def yesno_turn(scene: S.Scene, rng: random.Random, kinds: tuple[str, ...] | None = None) -> Turn | None:
    """One question of a yes/no pair (of one of `kinds` when given); None when 50 draws gave none of `kinds`
    (some scenes admit no question of a kind: a mix of colour questions alone looped forever on them)."""
    for _ in range(50):
        kind, pair = S.yesno_pair(scene, rng)
        if kinds is None or kind in kinds:
            return rng.choice(pair)
    return None


def lookup_turn(scene: S.Scene, rng: random.Random) -> Turn:
    """The colour of a category the scene holds once, the place of a unique (colour, category), or a count."""
    counts = S._counts(scene)
    singles = [o for o in scene.objects if counts[o.category] == 1]
    uniques = S._unique_colour_category(scene)
    r = rng.random()
    if r < 0.35 and singles:
        obj = rng.choice(singles)
        return f"What colour is the {obj.category}?", obj.colour
    if r < 0.7 and uniques:
        obj = rng.choice(uniques)
        place = S.CELL_PHRASES[S.grid_cell(obj, scene.width, scene.height)]
        return f"Where is the {obj.colour} {obj.category}?", f"{place[0].upper()}{place[1:]}."
    return S.counting_qa(scene, rng)


def _noised(scene: S.Scene, mentions: list[S.Mention], rng: random.Random, caption_noise: float) -> list[S.Mention]:
    if rng.random() >= caption_noise:
        return mentions
    return S.with_extra_mention(mentions, S.absent_mention(scene, rng, mentions), rng)


def short_turn(scene: S.Scene, rng: random.Random, caption_noise: float = 0.0) -> Turn:
    prompt = rng.choice(S.SHORT_PROMPTS)
    return prompt, S.short_description(_noised(scene, S.scene_mentions(scene, rng), rng, caption_noise))


def detailed_turn(scene: S.Scene, rng: random.Random, caption_noise: float = 0.0) -> Turn:
    prompt, variant = rng.choice(S.DETAILED_PROMPTS), rng.randrange(2)
    mentions = _noised(scene, S.scene_mentions(scene, rng, S.SYNONYM_P), rng, caption_noise)
    return prompt, S.detailed_description(mentions, variant)


def _box_text(scene: S.Scene, obj: S.SceneObject) -> str:
    """The object's drawn box on the unpadded 0-1000 grid, as the exercise writes it."""
    return format_box(pixel_to_grid(obj.bbox, scene.width, scene.height, square_pad=False))


def grounding_turn(scene: S.Scene, rng: random.Random) -> Turn | None:
    """None when the drawn object has no expression that picks it out alone."""
    index = rng.randrange(len(scene.objects))
    expression = S.referring_expression(scene, index, rng)
    if expression is None:
        return None
    return GROUNDING_PROMPT.format(expression=expression), _box_text(scene, scene.objects[index])


def box_list(scene: S.Scene, rng: random.Random) -> Turn:
    items = []
    for index, obj in enumerate(scene.objects):
        expression = S.referring_expression(scene, index, rng)
        if expression is not None:
            items.append(f"{expression} {_box_text(scene, obj)}")
    rng.shuffle(items)
    return "Where is each object?", " " + " ; ".join(items) + " ."


_PLACE_OF = {phrase: cell for cell, phrase in S.CELL_PHRASES.items()}
_GROUNDING = re.compile(re.escape(GROUNDING_PROMPT).replace(re.escape("{expression}"), "(.+)"))


def answering_objects(scene: S.Scene, question: str) -> list[bool] | None:
    """Per object of the scene: is it what the question asks about (for a yes/no question: does it make the
    answer Yes); None for a question of no kind below (descriptions, statements). The supervision of the
    base's match head: with the image after the question, each image position can say whether it answers it.

    existence "Is there a moon ...?" its category; colour "Is there a red moon ...?" colour and category;
    count "Are there exactly two moons ...?" its category, in a scene holding that many; position "Is the red
    moon in the top left ...?" colour, category and 3x3 place; lookups "What colour is the moon?" / "Where is
    the red moon?" / "How many moons are there?" the objects asked about; grounding the referred object."""
    q = question.removesuffix(S.YESNO_SUFFIX)
    counts = S._counts(scene)
    objects = scene.objects
    if m := re.fullmatch(r"Is there exactly one (\w+) in the image\?", q):
        return [o.category == m[1] and counts[m[1]] == 1 for o in objects]
    if m := re.fullmatch(r"Are there exactly (\w+) (\w+) in the image\?", q):
        category = S.mentioned_categories(m[2])[0]
        return [o.category == category and counts[category] == S.NUMBER_WORDS.index(m[1]) for o in objects]
    if m := re.fullmatch(r"Is there an? (?:(\w+) )?(\w+) in the image\?", q):
        return [o.category == m[2] and m[1] in (None, o.colour) for o in objects]
    if m := re.fullmatch(r"Is the (\w+) (\w+) (.+) of the image\?", q):
        return [(o.colour, o.category, S.grid_cell(o, scene.width, scene.height)) == (m[1], m[2], _PLACE_OF[m[3]])
                for o in objects]
    if m := re.fullmatch(r"What colour is the (\w+)\?", q):
        return [o.category == m[1] for o in objects]
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        return [(o.colour, o.category) == (m[1], m[2]) for o in objects]
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        return [o.category == S.mentioned_categories(m[1])[0] for o in objects]
    if m := _GROUNDING.fullmatch(q):
        colour, category, qualifier = S.parse_referring_expression(m[1])
        hits = set(S.objects_matching(scene, colour, category, qualifier))
        return [i in hits for i in range(len(objects))]
    return None


_PIECE_END = re.compile(r"\. |, | and ")  # where a description's sentence or list item ends


def described_objects(scene: S.Scene, description: str) -> list[tuple[int, int, int]]:
    """(start, end, object index) per sentence or list item of a world description that names one of the scene's
    objects: the span of characters in which the text is about that object (an added absent object's piece, the
    count sentence and the text after the last piece get none). Objects are named in raster order, each as its
    colour and one of its category's names; a colour-category pair held twice is matched in that order. The
    supervision of the base's pointer head: which image cell each description token is about."""
    starts = [0] + [m.end() for m in _PIECE_END.finditer(description)]
    pieces = list(zip(starts, starts[1:] + [len(description)]))
    out, searched = [], 0
    for index, obj in enumerate(scene.objects):
        names = "|".join(re.escape(n) for n in S.CATEGORIES[obj.category])
        found = re.compile(rf"\b{re.escape(obj.colour)} (?:{names})\b").search(description, searched)
        if found is None:
            continue  # not named (a description of another scene, or one cut short)
        searched = found.end()
        start, end = next(p for p in pieces if p[0] <= found.start() < p[1])
        out.append((start, end, index))
    return out


@dataclass(frozen=True)
class LessonMix:
    """Weights of the turn makers; `statements` is a last turn added to every conversation when True."""

    yesno: float = 0.35
    lookup: float = 0.10
    short: float = 0.10
    detailed: float = 0.20
    grounding: float = 0.25
    statements: bool = True
    caption_noise: float = 0.0  # share of descriptions with one absent object added
    yesno_kinds: tuple[str, ...] | None = None  # only these kinds of yes/no question (None: all four)
    dense: str = "statements"  # the dense lookup turn: "statements" (all four kinds) or "inventory" (existence)
    alone: float = 0.0  # share of conversations that are one writing turn alone, as an evaluation asks it

    def turns(self, scene: S.Scene, rng: random.Random, n: int) -> list[Turn]:
        """n turns about the scene (n - 1 drawn from the weights, plus the statements): asking turns first, then
        the statements, then the writing turns."""
        asking = [(self.yesno, lambda sc, r: yesno_turn(sc, r, self.yesno_kinds)), (self.lookup, lookup_turn)]
        writing = [(self.short, lambda sc, r: short_turn(sc, r, self.caption_noise)),
                   (self.detailed, lambda sc, r: detailed_turn(sc, r, self.caption_noise)),
                   (self.grounding, grounding_turn)]
        if self.alone > 0 and rng.random() < self.alone:
            # measured: a base that only ever wrote after questions and statements answered a description
            # prompt asked first with "1" (Recall 7.4)
            alone = [(w, m) for w, m in writing if w > 0]
            for _ in range(10 if alone else 0):  # grounding alone may find no expression: then a full conversation
                turn = rng.choices([m for _, m in alone], [w for w, _ in alone])[0](scene, rng)
                if turn is not None:
                    return [turn]
        makers = [(w, m, rank) for rank, group in ((0, asking), (2, writing)) for w, m in group if w > 0]
        if not makers:
            raise ValueError("a LessonMix needs at least one turn maker with a positive weight")
        drawn, tries = [], 0
        while len(drawn) < (n - 1 if self.statements else n) and tries < 50 * n:  # fewer turns, never a hang
            tries += 1
            _, maker, rank = rng.choices(makers, [w for w, _, _ in makers])[0]
            turn = maker(scene, rng)
            if turn is not None:
                drawn.append((rank, turn))
        if self.statements:
            drawn.append((1, (inventory if self.dense == "inventory" else statements)(scene, rng)))
        return [turn for _, turn in sorted(drawn, key=lambda item: item[0])]


def with_descriptions(mix: LessonMix, alone: float = 0.3) -> LessonMix:
    """`mix` with descriptions kept: a share of conversations one description alone (asked first, as the
    description bench asks), and descriptions among the writing turns after the questions. Without them a stage of
    questions alone erases what the describe stage taught (next-object colour 1.00 -> .00 in 500 existence steps);
    with them existence reached .99 and the walk stayed (.94-1.00) (docs/probes/README.md, e3 / e4)."""
    return replace(mix, short=0.1, detailed=0.2, alone=alone)


# The base's first stage (`read`), from a random LLM: yes/no questions of every kind, the statements turn after them.
# With the image after the question and the match head, 1,000 steps at 1e-3 took it to 1.00 / .96 / 1.00 / 1.00
# (colour / count / existence / position) from slots; without the statements turn .73 / .79 / .50 / .91
# (docs/probes/README.md, "Stop 34": m1, m2).
QUESTIONS_AND_STATEMENTS = LessonMix(yesno=1.0, lookup=0.0, short=0.0, detailed=0.0, grounding=0.0)

# Stop 33's recipe, not the course's now (these four and `with_descriptions` stay for the probes and for describe
# stages before the question-first read, the next variant to measure: docs/probes/README.md, "Stop 35").
# Its first stage, from a random LLM: descriptions alone, each asked first. Only an LLM that learnt to write
# descriptions before any question finds the next object in the slots (teacher-forced next-object colour .92-1.00
# for objects 1-6 and greedy descriptions naming 0.989 of the pairs, after two 500-step schedules at 1e-3); every
# LLM that met the questions first stayed at .6-.75 after the first object, whatever else was changed
# (docs/probes/README.md, "Descriptions first": d0L against w1, g1, k1, n1).
DESCRIBE_ALONE = LessonMix(yesno=0.0, lookup=0.0, short=1 / 3, detailed=2 / 3, grounding=0.0, statements=False,
                           alone=1.0)

# A fresh LLM finds the lookup a yes/no question needs only when one kind comes alone first: in any mix with
# descriptions it stayed at chance for 500 steps; with 500 steps of this first, existence was 1.00 at step 500
# and colour and count moved within 250 steps of the full mix (docs/probes/README.md, d1c / d1d).
EXISTENCE_FIRST = LessonMix(yesno=1.0, lookup=0.0, short=0.0, detailed=0.0, grounding=0.0,
                            yesno_kinds=("existence",), dense="inventory")

# After it, colour binding (a colour to its shape) could still stay at chance for 1,000 steps of the full mix (the
# first full course run: colour .51 at step 1,000); 300 steps of colour questions alone on a fresh schedule at 5e-4
# then gave .94 (docs/probes/README.md, c1): the base's `bind` stage. The statements turn keeps every kind's lookup
# in view meanwhile. Inside read's own schedule right after the existence steps (~1e-3) it took every kind to .50.
COLOUR_NEXT = LessonMix(yesno=1.0, lookup=0.0, short=0.0, detailed=0.0, grounding=0.0, yesno_kinds=("color",))

# After bind and settle the LLM still barely reads one value out of one slot: from perfect slots "What colour is
# the moon?" 0.25 (chance 0.17), "Where is the red moon?" 0.22 (chance 0.11); it answers what a soft mixture of
# slots answers. 300 steps of open lookups alone at 5e-4 raised them to 0.72 / 0.40, and the full mix after them
# (a second settle) kept 0.62 / 0.46 with yes/no .99/.99/1.00/.54 (docs/probes/README.md, l2 / l2s).
LOOKUP_ONLY = LessonMix(yesno=0.0, lookup=1.0, short=0.0, detailed=0.0, grounding=0.0)


def fresh_scene(rng: random.Random) -> S.Scene:
    """A new scene with its drawn (tight) boxes, objects in raster order, without painting it."""
    return S.drawn_scene(S.sample_scene(rng, "lesson"))


def tokenizer_texts(n_scenes: int = 400, seed: int = 0) -> list[str]:
    """Every kind of lesson text, for training a tokenizer that holds the lessons' words whole."""
    rng = random.Random(f"lessons/tokenizer/{seed}")
    mix = LessonMix(caption_noise=0.5)
    texts = []
    for _ in range(n_scenes):
        scene = fresh_scene(rng)
        for question, answer in mix.turns(scene, rng, 5) + [box_list(scene, rng)]:
            texts += [question, answer]
    return texts
