"""The synthetic scene world: coloured shapes on a light background, and every text about a scene.

A scene is 1-6 flat shapes (categories in `CATEGORIES`, colours in `COLOURS`) at continuous positions and
sizes on a near-white, faintly cluttered background. Everything here is a pure function of a
`random.Random`, so a seed fixes pixels and texts alike.

Design choices, and why:
- Categories that only SHAPE tells apart (circle / ring / moon, square / diamond, star / cross / heart ...)
  and six clearly distinct colours: a model must look at both to describe a scene.
- Objects are kept in RASTER order (bands of a third of the height, top first, then left to right by the
  centre of the drawn box): a tiny model learns to list objects in an order it can follow while scanning
  several times faster than a globally sorted order (reference/tiny_model_notes.md).
- Positions are words of a 3x3 grid (rows top/middle/bottom, columns left/center/right, by box centre).
- Shapes are drawn at 2x on a small mask and reduced (clean edges at 18 px); the mask also gives the tight
  pixel box [x0, y0, x1, y1] (x1, y1 exclusive, PIL's convention) of what was actually drawn.
- Objects never overlap: placement rejects a sample whose enclosing square touches another's.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# canonical name -> names a text may use for it, the canonical one first. No name is shared, and none is a
# colour, size or position word, so a caption maps back to categories without ambiguity (CHAIR needs this).
CATEGORIES: dict[str, list[str]] = {
    "circle": ["circle", "disc"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge"],
    "star": ["star", "starburst"],
    "heart": ["heart", "valentine"],
    "cross": ["cross", "plus"],
    "hexagon": ["hexagon", "hex"],
    "diamond": ["diamond", "rhombus", "lozenge"],
    "ring": ["ring", "donut", "hoop"],
    "moon": ["moon", "crescent"],
    "arrow": ["arrow", "pointer"],
}
# Bigrams a caption might use for one object (for the CHAIR parser); our own texts use single words.
DOUBLE_WORDS: dict[str, str] = {"crescent moon": "moon", "plus sign": "cross"}
# name -> RGB. Far apart in RGB and all dark or saturated enough to stand out from a near-white background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 25),
    "purple": (140, 60, 190),
    "orange": (245, 125, 5),
}
NAME_TO_CATEGORY = {name: cat for cat, names in CATEGORIES.items() for name in names}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
# (row, column) -> the phrase a description uses for that cell of the 3x3 grid
CELL_PHRASES = {
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}
# Qualifiers of a referring expression: phrase -> (row or None, column or None); None matches any.
QUALIFIERS = {
    "on the left": (None, 0), "on the right": (None, 2), "at the top": (0, None), "at the bottom": (2, None),
    "in the top left": (0, 0), "in the top right": (0, 2), "in the bottom left": (2, 0),
    "in the bottom right": (2, 2), "in the center": (1, 1), "in the top center": (0, 1),
    "in the bottom center": (2, 1), "in the center left": (1, 0), "in the center right": (1, 2),
}
SHORT_PROMPTS = ("Describe the image briefly.", "Write a short caption for the image.", "What is in the image?")
DETAILED_PROMPTS = (
    "Describe this image in detail.",
    "Provide a detailed description of the image.",
    "What objects are in this image? Describe each of them.",
    "Give a thorough description of everything you see in the picture.",
    "Describe the image, including the colour, size and position of every object.",
    "Write a detailed caption for this image.",
    "Explain what is shown in the image in detail.",
)
YESNO_SUFFIX = " Please answer yes or no."

# Image sizes. Most have area <= 112*112, so at scale_resolution 112 the tiny model sees one 8x8-patch view;
# the rest are larger or about 4:1, so the slicing path is exercised.
SMALL_SIZES = ((112, 112), (128, 96), (96, 128), (120, 104), (104, 120))
EXTREME_SIZES = ((448, 112), (112, 448), (384, 96), (96, 384), (336, 112), (112, 336))
LARGE_SIDES = range(160, 481, 16)
MIN_SIZE_FRAC, MAX_SIZE_FRAC = 0.16, 0.40  # object extent / short side: >= 18 px at 112, still recognisable
FILL = 0.30  # enclosing squares may cover at most this fraction of the image (caps size when crowded)
REPEAT_P = 0.3  # chance an object repeats a category already in the scene, so counts above one are common
SYNONYM_P = 0.2  # chance a detailed description or referring expression names an object by a synonym
SUPERSAMPLE = 2


@dataclass(frozen=True)
class SceneObject:
    category: str
    colour: str
    cx: float  # sampled centre and extent (diameter of the circle that encloses the unit shape), pixels
    cy: float
    size: float
    rotation: float  # degrees, counter-clockwise
    bbox: tuple[int, int, int, int] | None = None  # tight box of the drawn shape, set by render_scene


@dataclass(frozen=True)
class Scene:
    image_id: str
    width: int
    height: int
    objects: tuple[SceneObject, ...]
    style_seed: int  # background tint, clutter and colour jitter


# ---- sampling ----------------------------------------------------------------------------------------------------

def sample_image_size(rng: random.Random, large_fraction: float = 0.15) -> tuple[int, int]:
    """(width, height): a small size with probability 1 - large_fraction, else half large, half ~4:1."""
    if rng.random() >= large_fraction:
        return rng.choice(SMALL_SIZES)
    if rng.random() < 0.5:
        return rng.choice(EXTREME_SIZES)
    return rng.choice(LARGE_SIDES), rng.choice(LARGE_SIDES)


def sample_scene(rng: random.Random, image_id: str, large_fraction: float = 0.15, max_objects: int = 6) -> Scene:
    """Sample an image size and 1..max_objects non-overlapping objects (drop any that cannot be placed)."""
    width, height = sample_image_size(rng, large_fraction)
    short = min(width, height)
    n_objects = rng.randint(1, max_objects)
    max_frac = max(MIN_SIZE_FRAC, min(MAX_SIZE_FRAC, math.sqrt(FILL * width * height / n_objects) / short))
    placed: list[tuple[float, float, float, float]] = []  # enclosing squares x0, y0, x1, y1
    objects = []
    for _ in range(n_objects):
        if objects and rng.random() < REPEAT_P:
            category = rng.choice([o.category for o in objects])
        else:
            category = rng.choice(list(CATEGORIES))
        colour = rng.choice(list(COLOURS))
        base = rng.choice((0.0, 180.0)) if category in ("arrow", "moon") else 0.0
        rotation = 0.0 if category in ("circle", "ring") else round(base + rng.uniform(-12.0, 12.0), 2)
        for _attempt in range(50):
            size = round(rng.uniform(MIN_SIZE_FRAC, max_frac) * short, 2)
            half = size / 2 + 2  # 2 px gap between objects and from the border
            cx = round(rng.uniform(half, width - half), 2)
            cy = round(rng.uniform(half, height - half), 2)
            square = (cx - half, cy - half, cx + half, cy + half)
            if all(square[2] <= p[0] or p[2] <= square[0] or square[3] <= p[1] or p[3] <= square[1] for p in placed):
                placed.append(square)
                objects.append(SceneObject(category, colour, cx, cy, size, rotation))
                break
    return Scene(image_id, width, height, tuple(objects), style_seed=rng.getrandbits(32))


# ---- rendering ---------------------------------------------------------------------------------------------------

def _regular(k: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start_deg + 360 * i / k)),
             radius * math.sin(math.radians(start_deg + 360 * i / k))) for i in range(k)]


def _star() -> list[tuple[float, float]]:
    return [((1.0 if i % 2 == 0 else 0.42) * math.cos(math.radians(-90 + 36 * i)),
             (1.0 if i % 2 == 0 else 0.42) * math.sin(math.radians(-90 + 36 * i)) + 0.05) for i in range(10)]


def _heart() -> list[tuple[float, float]]:
    ts = [2 * math.pi * i / 48 for i in range(48)]
    return [(16 * math.sin(t) ** 3 / 17,
             -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17 - 0.15)
            for t in ts]


_ARM, _REACH = 0.3, 0.95
# Unit outlines (y down, enclosed by a circle of radius ~1 around the centre) of the polygon categories.
UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)],
    "diamond": [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)],
    "triangle": [(0.0, -0.95), (0.9, 0.6), (-0.9, 0.6)],
    "hexagon": _regular(6, 0.97, 0.0),
    "star": _star(),
    "heart": _heart(),
    "cross": [(-_ARM, -_REACH), (_ARM, -_REACH), (_ARM, -_ARM), (_REACH, -_ARM), (_REACH, _ARM), (_ARM, _ARM),
              (_ARM, _REACH), (-_ARM, _REACH), (-_ARM, _ARM), (-_REACH, _ARM), (-_REACH, -_ARM), (-_ARM, -_ARM)],
    "arrow": [(-0.95, -0.2), (0.15, -0.2), (0.15, -0.6), (0.95, 0.0), (0.15, 0.6), (0.15, 0.2), (-0.95, 0.2)],
}


def draw_object_mask(obj: SceneObject) -> tuple[Image.Image, int, int]:
    """The shape's coverage as an 'L' mask (antialiased by 2x supersampling) and its top-left pixel offset."""
    side = int(math.ceil(obj.size * 1.2)) + 4
    ox, oy = int(math.floor(obj.cx - side / 2)), int(math.floor(obj.cy - side / 2))
    s, radius = SUPERSAMPLE, obj.size / 2
    big = Image.new("L", (side * s, side * s), 0)
    draw = ImageDraw.Draw(big)
    cos_r, sin_r = math.cos(math.radians(obj.rotation)), math.sin(math.radians(obj.rotation))

    def to_mask(x: float, y: float) -> tuple[float, float]:  # unit coords -> supersampled mask coords
        xr, yr = x * cos_r + y * sin_r, -x * sin_r + y * cos_r
        return (obj.cx + radius * xr - ox) * s, (obj.cy + radius * yr - oy) * s

    def disc(x: float, y: float, r: float, fill: int) -> None:
        px, py = to_mask(x, y)
        draw.ellipse((px - r * radius * s, py - r * radius * s, px + r * radius * s, py + r * radius * s), fill=fill)

    if obj.category == "circle":
        disc(0, 0, 0.95, 255)
    elif obj.category == "ring":
        disc(0, 0, 0.95, 255)
        disc(0, 0, 0.55, 0)
    elif obj.category == "moon":
        disc(0, 0, 0.95, 255)
        disc(0.45, -0.1, 0.78, 0)
    else:
        draw.polygon([to_mask(x, y) for x, y in UNIT_POLYGONS[obj.category]], fill=255)
    return big.reduce(s), ox, oy


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """Near-white with a slight tint and a gentle linear gradient."""
    tint = np.array([rng.randint(234, 250) for _ in range(3)], dtype=np.float32)
    gx, gy = rng.uniform(-6, 6), rng.uniform(-6, 6)
    ramp = gx * (np.arange(width, dtype=np.float32) / width - 0.5)[None, :] \
        + gy * (np.arange(height, dtype=np.float32) / height - 0.5)[:, None]  # (H, W)
    pixels = np.clip(tint[None, None, :] + ramp[:, :, None], 0, 255).round().astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(pixels, "RGB")


def _clutter(rng: random.Random, image: Image.Image) -> None:
    """Faint thin lines and 1-2 px dots: texture that is not an object."""
    width, height = image.size
    draw, short = ImageDraw.Draw(image), min(width, height)
    for _ in range(rng.randint(1, 2 + width * height // 8000)):
        x, y, length, angle = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.1, 0.4) * short, \
            rng.uniform(0, math.pi)
        grey = rng.randint(190, 215)
        draw.line((x, y, x + length * math.cos(angle), y + length * math.sin(angle)), fill=(grey,) * 3, width=1)
    for _ in range(rng.randint(3, 6 + width * height // 1500)):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.4, 1.0)
        grey = rng.randint(175, 210)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(grey,) * 3)


_COVERED = [0] * 64 + [255] * 192  # a pixel belongs to the drawn shape when its coverage is >= 1/4


def _drawn_box(scene: Scene, mask: Image.Image, ox: int, oy: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = mask.point(_COVERED).getbbox()
    return max(0, ox + x0), max(0, oy + y0), min(scene.width, ox + x1), min(scene.height, oy + y1)


def _in_raster_order(scene: Scene, drawn: list[SceneObject]) -> Scene:
    drawn.sort(key=lambda o: raster_key(o, scene.width, scene.height))
    return dataclasses.replace(scene, objects=tuple(drawn))


def render_scene(scene: Scene) -> tuple[Image.Image, Scene]:
    """Draw the scene; return the RGB image and the scene with tight boxes, objects in raster order."""
    rng = random.Random(scene.style_seed)
    image = _background(rng, scene.width, scene.height)
    _clutter(rng, image)
    drawn = []
    for obj in scene.objects:
        mask, ox, oy = draw_object_mask(obj)
        rgb = tuple(min(255, max(0, c + rng.randint(-6, 6))) for c in COLOURS[obj.colour])
        image.paste(rgb, (ox, oy, ox + mask.width, oy + mask.height), mask)
        drawn.append(dataclasses.replace(obj, bbox=_drawn_box(scene, mask, ox, oy)))
    return image, _in_raster_order(scene, drawn)


def drawn_scene(scene: Scene) -> Scene:
    """The scene `render_scene` returns, without painting the image (the shapes' masks give the boxes)."""
    drawn = [dataclasses.replace(obj, bbox=_drawn_box(scene, *draw_object_mask(obj))) for obj in scene.objects]
    return _in_raster_order(scene, drawn)


# ---- geometry words ----------------------------------------------------------------------------------------------

def centre(obj: SceneObject) -> tuple[float, float]:
    """Centre of the drawn box (the sampled centre before rendering)."""
    return (obj.cx, obj.cy) if obj.bbox is None else ((obj.bbox[0] + obj.bbox[2]) / 2, (obj.bbox[1] + obj.bbox[3]) / 2)


def grid_cell(obj: SceneObject, width: int, height: int) -> tuple[int, int]:
    """(row, column) of the object's centre in the 3x3 grid."""
    cx, cy = centre(obj)
    return min(2, int(3 * cy / height)), min(2, int(3 * cx / width))


def raster_key(obj: SceneObject, width: int, height: int) -> tuple[int, float]:
    """Sort key of raster order: row band first, then the centre's column."""
    return grid_cell(obj, width, height)[0], centre(obj)[0]


def size_word(obj: SceneObject, width: int, height: int) -> str:
    frac = obj.size / min(width, height)
    return "small" if frac < 0.22 else "medium-sized" if frac < 0.31 else "large"


def plural(name: str) -> str:
    return name + "es" if name.endswith(("s", "x", "sh", "ch")) else name + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def number_phrase(count: int, name: str) -> str:
    return f"{NUMBER_WORDS[count]} {name if count == 1 else plural(name)}"


_PLURAL_TO_NAME = {plural(name): name for name in NAME_TO_CATEGORY}


def mentioned_categories(text: str) -> list[str]:
    """Canonical categories a text names, in order of mention (plurals and synonyms folded; no bigrams)."""
    words = re.findall(r"[a-z]+", text.lower())
    return [NAME_TO_CATEGORY[_PLURAL_TO_NAME.get(w, w)] for w in words if _PLURAL_TO_NAME.get(w, w) in NAME_TO_CATEGORY]


# ---- descriptions ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mention:
    """One object as a description names it."""
    name: str  # the word used: canonical or a synonym
    colour: str
    size: str
    place: str  # a CELL_PHRASES value


def scene_mentions(scene: Scene, rng: random.Random, synonym_p: float = 0.0) -> list[Mention]:
    """The scene's objects as mentions, raster order; each named by a synonym with probability synonym_p."""
    mentions = []
    for obj in scene.objects:
        names = CATEGORIES[obj.category]
        name = rng.choice(names[1:]) if len(names) > 1 and rng.random() < synonym_p else names[0]
        mentions.append(Mention(name, obj.colour, size_word(obj, scene.width, scene.height),
                                CELL_PHRASES[grid_cell(obj, scene.width, scene.height)]))
    return mentions


def absent_mention(scene: Scene, rng: random.Random, present: list[Mention] | None = None) -> Mention:
    """A plausible mention of an object whose category is in neither the scene nor `present`."""
    taken = {o.category for o in scene.objects} | {NAME_TO_CATEGORY[m.name] for m in present or []}
    category = rng.choice([c for c in CATEGORIES if c not in taken])
    return Mention(category, rng.choice(list(COLOURS)), rng.choice(("small", "medium-sized", "large")),
                   rng.choice(list(CELL_PHRASES.values())))


def with_extra_mention(mentions: list[Mention], extra: Mention, rng: random.Random) -> list[Mention]:
    """Insert a mention at a random position of the list (how a noisy caption adds an object)."""
    position = rng.randint(0, len(mentions))
    return mentions[:position] + [extra] + mentions[position:]


def short_description(mentions: list[Mention]) -> str:
    """'a red star, a blue circle and an orange ring.'"""
    items = [f"{article(m.colour)} {m.colour} {m.name}" for m in mentions]
    text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return text + "."


def detailed_description(mentions: list[Mention], variant: int = 0) -> str:
    """A count sentence, then one sentence per object with size, colour and place (variant picks the wording)."""
    n = len(mentions)
    sentences = [f"The image shows {number_phrase(n, 'object')} on a light background."]
    for m in mentions:
        if variant == 0:
            sentences.append(f"A {m.size} {m.colour} {m.name} is {m.place}.")
        else:
            sentences.append(f"{m.place[0].upper()}{m.place[1:]} there is a {m.size} {m.colour} {m.name}.")
    return " ".join(sentences)


def preference_rejected(scene: Scene, mentions: list[Mention], rng: random.Random) -> tuple[list[Mention], str]:
    """Corrupt a correct mention list: an extra hallucinated object, a wrong shape, or a wrong colour."""
    kind = rng.choices(("hallucinated_object", "wrong_shape", "wrong_colour"), weights=(0.4, 0.4, 0.2))[0]
    if kind == "hallucinated_object":
        return with_extra_mention(mentions, absent_mention(scene, rng), rng), kind
    index = rng.randrange(len(mentions))
    wrong = mentions[index]
    if kind == "wrong_shape":
        wrong = dataclasses.replace(wrong, name=absent_mention(scene, rng).name)
    else:
        wrong = dataclasses.replace(wrong, colour=rng.choice([c for c in COLOURS if c != wrong.colour]))
    return mentions[:index] + [wrong] + mentions[index + 1:], kind


# ---- questions ---------------------------------------------------------------------------------------------------

def _counts(scene: Scene) -> dict[str, int]:
    return dict(Counter(obj.category for obj in scene.objects))


def _unique_colour_category(scene: Scene) -> list[SceneObject]:
    keys = [(o.colour, o.category) for o in scene.objects]
    return [o for o in scene.objects if keys.count((o.colour, o.category)) == 1]


def yesno_pair(scene: Scene, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """(MME category, [(question, answer) x 2]): one 'Yes' and one 'No' question of that category, random order."""
    counts = _counts(scene)
    kinds = ["existence", "color", "count"] + (["position"] if _unique_colour_category(scene) else [])
    kind = rng.choice(kinds)
    absent = [c for c in CATEGORIES if c not in counts]
    if kind == "color":
        obj = rng.choice(scene.objects)
        used = {o.colour for o in scene.objects if o.category == obj.category}
        other = [c for c in COLOURS if c not in used]
        kind = kind if other else "existence"
    if kind == "existence":
        cat, missing = rng.choice(sorted(counts)), rng.choice(absent)
        yes = f"Is there {article(cat)} {cat} in the image?"
        no = f"Is there {article(missing)} {missing} in the image?"
    elif kind == "color":
        wrong = rng.choice(other)
        yes = f"Is there {article(obj.colour)} {obj.colour} {obj.category} in the image?"
        no = f"Is there {article(wrong)} {wrong} {obj.category} in the image?"
    elif kind == "count":
        cat = rng.choice(sorted(counts))
        right = counts[cat]
        wrong = wrong_count(right, rng)
        yes, no = count_question(cat, right), count_question(cat, wrong)
    else:
        obj = rng.choice(_unique_colour_category(scene))
        row, col = grid_cell(obj, scene.width, scene.height)
        far = rng.choice([cell for cell in CELL_PHRASES if cell[0] != row and cell[1] != col])
        yes = f"Is the {obj.colour} {obj.category} {CELL_PHRASES[(row, col)]} of the image?"
        no = f"Is the {obj.colour} {obj.category} {CELL_PHRASES[far]} of the image?"
    pair = [(yes + YESNO_SUFFIX, "Yes"), (no + YESNO_SUFFIX, "No")]
    return kind, pair if rng.random() < 0.5 else pair[::-1]


def wrong_count(right: int, rng: random.Random) -> int:
    """The count a 'No' question asks about: one more, or (half the time, for more than one) one fewer."""
    return right + 1 if right == 1 or rng.random() < 0.5 else right - 1


def count_question(category: str, k: int) -> str:
    """'Is there exactly one star in the image?' / 'Are there exactly two stars in the image?' (no suffix)."""
    return f"Is there exactly one {category} in the image?" if k == 1 else \
        f"Are there exactly {number_phrase(k, category)} in the image?"


def counting_qa(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """('How many stars are there?', '2'); one time in five about a category that is absent ('0')."""
    counts = _counts(scene)
    absent = [c for c in CATEGORIES if c not in counts]
    cat = rng.choice(absent) if rng.random() < 0.2 else rng.choice(sorted(counts))
    return f"How many {plural(cat)} are there?", str(counts.get(cat, 0))


def dialogue(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """2-3 (user, assistant) turns: a brief description or object count first, then follow-up questions."""
    counts = _counts(scene)
    openers = [("Describe the image briefly.", short_description(scene_mentions(scene, rng))),
               ("How many objects are there?", str(len(scene.objects)))]
    follow_ups = [counting_qa(scene, rng)]
    singles = [o for o in scene.objects if counts[o.category] == 1]
    if singles:
        obj = rng.choice(singles)
        follow_ups.append((f"What colour is the {obj.category}?", obj.colour))
    uniques = _unique_colour_category(scene)
    if uniques:
        obj = rng.choice(uniques)
        place = CELL_PHRASES[grid_cell(obj, scene.width, scene.height)]
        follow_ups.append((f"Where is the {obj.colour} {obj.category}?", f"{place[0].upper()}{place[1:]}."))
    cat = rng.choice(list(CATEGORIES))
    follow_ups.append((f"Is there {article(cat)} {cat} in the image?", "Yes" if cat in counts else "No"))
    rng.shuffle(follow_ups)
    return [rng.choice(openers)] + follow_ups[:rng.randint(1, 2)]


# ---- referring expressions ---------------------------------------------------------------------------------------

def objects_matching(scene: Scene, colour: str, category: str, qualifier: str | None) -> list[int]:
    """Indices of the objects a referring expression's colour, category and position qualifier fit."""
    row, col = QUALIFIERS[qualifier] if qualifier else (None, None)
    hits = []
    for i, obj in enumerate(scene.objects):
        r, c = grid_cell(obj, scene.width, scene.height)
        if obj.colour == colour and obj.category == category and row in (None, r) and col in (None, c):
            hits.append(i)
    return hits


def parse_referring_expression(expression: str) -> tuple[str, str, str | None]:
    """'the red disc on the left' -> ('red', 'circle', 'on the left')."""
    words = expression.split()
    if len(words) < 3 or words[0] != "the" or words[1] not in COLOURS or words[2] not in NAME_TO_CATEGORY:
        raise ValueError(f"not a referring expression of this world: {expression!r}")
    qualifier = " ".join(words[3:]) or None
    if qualifier is not None and qualifier not in QUALIFIERS:
        raise ValueError(f"unknown position qualifier in {expression!r}")
    return words[1], NAME_TO_CATEGORY[words[2]], qualifier


def referring_expression(scene: Scene, index: int, rng: random.Random) -> str | None:
    """'the red star' if that fits one object, else with the fewest position words that make it unique;
    None when no expression picks out this object alone."""
    obj = scene.objects[index]
    names = CATEGORIES[obj.category]
    name = rng.choice(names[1:]) if len(names) > 1 and rng.random() < SYNONYM_P else names[0]
    row, col = grid_cell(obj, scene.width, scene.height)
    fitting = [q for q, (r, c) in QUALIFIERS.items() if r in (None, row) and c in (None, col)]
    for qualifier in [None] + sorted(fitting, key=lambda q: sum(v is not None for v in QUALIFIERS[q])):
        if objects_matching(scene, obj.colour, obj.category, qualifier) == [index]:
            return f"the {obj.colour} {name}" + (f" {qualifier}" if qualifier else "")
    return None


# ---- (de)serialisation -------------------------------------------------------------------------------------------

_OBJECT_FIELDS = [f.name for f in dataclasses.fields(SceneObject)]


def scene_to_dict(scene: Scene) -> dict:
    return {"image_id": scene.image_id, "width": scene.width, "height": scene.height,
            "style_seed": scene.style_seed,
            "objects": [{field: getattr(o, field) for field in _OBJECT_FIELDS} for o in scene.objects]}


def scene_from_dict(record: dict) -> Scene:
    objects = tuple(SceneObject(**{**o, "bbox": None if o["bbox"] is None else tuple(o["bbox"])})
                    for o in record["objects"])
    return Scene(record["image_id"], record["width"], record["height"], objects, record["style_seed"])
