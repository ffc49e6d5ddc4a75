"""Scenes as slot vectors: what the base's LLM reads in place of image tokens while it learns to read scenes.

Real MLLMs pretrain the LLM on text first and align vision to it afterwards. The tiny base does the same with
a scene "spoken" directly in the LLM's embedding space: the Q image positions hold one vector per cell of a
G x G grid (Q = G*G), and each object adds to the cell holding its centre the sum of

    the LLM's own input embeddings of its colour, category and size words, of the two words of its 3x3 place
    ("top", "left") and of the word of its category's count ("two" for each circle of a two-circle scene),
    a learnt embedding of its (colour, category) pair, and its box: four learnt embeddings of its corner
    coordinates' bins, or (`box_code="fourier"`) each coordinate's digits as phases, or (`box_code="number"`) each
    coordinate as the number tokens' own code (`number_code`), turned by a fixed rotation of its own.

So a yes/no question's content word (" circle", " two", " left") meets the same embedding in the image: the
lookup a fresh LLM otherwise finds slowly. The vision tower and resampler are then trained to produce these
vectors from pixels (the align stage of `base_recipe`). Count and place words are global facts about the scene; they
are in the slot because the LLM reads them there directly (with rank words instead, count questions stayed
at .53-.72 held-out after 1,000 steps; with the category's count, .96 after 250).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from mllm.data.boxes import pixel_to_grid
from mllm.world import scenes as S

COLOURS = list(S.COLOURS)
CATEGORIES = list(S.CATEGORIES)
SIZES = ("small", "medium-sized", "large")
CELLS = sorted(S.CELL_PHRASES)  # the 3x3 places, (row, column)
COUNT_WORDS = S.NUMBER_WORDS[1:7]  # one .. six (a scene holds at most six objects)
BOX_BINS = 25  # bins per box coordinate on the 0-1000 grid
READOUT_SCALE = 4.0
# the census's scale: a held word scores 12, the "empty" logit 6, so that an empty cell's 11 categories at ~0 leave
# it empty at a loss of 0.03 (at READOUT_SCALE's 4 and 2 the true slots themselves scored 0.83)
CENSUS_SCALE = 12.0
BOX_PERIODS = (1000, 100, 10)  # the Fourier box code: one (cos, sin) pair per digit of a 0-1000 coordinate
NUMBER_CODE_DIM = 32  # the number code: Gaussian bumps along 0-1000, one every ~31
NUMBER_CODE_NORM = 0.5  # a coordinate's share of a slot: about an LLM word embedding's norm after read (0.55)
BOX_CODES = ("bins", "fourier", "number")
# the number code's read-back: neighbours' codes are near (cosine 0.5 fifty apart), so a word's scale of 4 leaves
# the softmax over 1000 numbers nearly flat
BOX_READOUT_SCALE = 16.0
_PLACE_STOP_WORDS = {"in", "the", "at", "on", "of"}


def place_words(cell: tuple[int, int]) -> tuple[str, str]:
    """The two content words of a place phrase ('in the top left' -> top, left; one word is repeated)."""
    words = [w for w in S.CELL_PHRASES[cell].split() if w not in _PLACE_STOP_WORDS]
    return tuple((words * 2)[:2])


def slot_features(scene: S.Scene, grid: int, cells: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
    """Per object: (cell in the grid x grid raster, colour, category, size, 4 box bins, 3x3 place, count - 1),
    all indices. The cell is where the drawn box's centre falls, or `cells`' (one per object: `assign_cells`)."""
    totals = Counter(o.category for o in scene.objects)
    out = []
    for obj in scene.objects:
        cx, cy = S.centre(obj)
        cell = min(grid - 1, int(grid * cy / scene.height)) * grid + min(grid - 1, int(grid * cx / scene.width))
        box = pixel_to_grid(obj.bbox, scene.width, scene.height, square_pad=False)
        bins = [min(BOX_BINS - 1, v * BOX_BINS // 1000) for v in box]
        out.append((cell, COLOURS.index(obj.colour), CATEGORIES.index(obj.category),
                    SIZES.index(S.size_word(obj, scene.width, scene.height)), *bins,
                    CELLS.index(S.grid_cell(obj, scene.width, scene.height)), min(6, totals[obj.category]) - 1))
    if cells is not None:
        out = [(cell, *f[1:]) for cell, f in zip(cells, out)]
    return out


def border_neighbours(scene: S.Scene, grid: int, tolerance: float) -> list[int | None]:
    """Per object: the cell across the border of its own cell nearest its centre when the centre lies within
    `tolerance` cells of that border (None otherwise, or at the grid's edge). Such an object is as well read in that
    neighbour: its pixels cannot say which side of a line a few pixels away its centre falls."""
    out = []
    for obj in scene.objects:
        cx, cy = S.centre(obj)
        u, v = grid * cx / scene.width, grid * cy / scene.height  # in cells
        col, row = min(grid - 1, int(u)), min(grid - 1, int(v))
        candidates = [(u - col, row, col - 1), (col + 1 - u, row, col + 1), (v - row, row - 1, col),
                      (row + 1 - v, row + 1, col)]
        distance, r, c = min(candidates)
        out.append(r * grid + c if distance < tolerance and 0 <= r < grid and 0 <= c < grid else None)
    return out


def box_phases(boxes: torch.Tensor) -> torch.Tensor:
    """[N, 4] coordinates on the 0-1000 grid -> [N, 4 * 2 * len(BOX_PERIODS)]: for each coordinate and each period
    P, cos and sin of 2 pi v / P. The digit of v that P / 10 counts is the sector of that angle (v = 372, P = 100:
    72 / 100 of a turn, the tens digit 7), so each digit is a linear read of one pair once its coordinate is picked,
    where a learnt embedding per bin leaves every (coordinate, bin) -> digit pair to be learnt alone. Measured no
    better than the bins (docs/probes/README.md, stop 38): the LLM reads neither, since picking the coordinate and
    place is the step it does not learn."""
    periods = torch.tensor(BOX_PERIODS, dtype=torch.float32, device=boxes.device)
    angles = 2 * torch.pi * boxes.float()[..., None] / periods  # (N, 4, P)
    return torch.stack((angles.cos(), angles.sin()), -1).flatten(1)  # (N, 4 * P * 2)


def number_code(hidden_size: int, seed: int, count: int = 1000, dim: int = NUMBER_CODE_DIM) -> torch.Tensor:
    """[count, hidden_size] unit rows, one per whole number 0 .. count-1: Gaussian bumps along 0-1000 (centres every
    1000 / dim, as wide), normalised, through a fixed orthonormal map into `dim` dimensions of the hidden space.
    Neighbours share most of their code (cosine 0.97 one apart, 0.5 fifty apart), and every code lies in one
    `dim`-dimensional subspace, within what one attention head (64 wide in the tiny LLM) can carry. The tiny base
    starts its LM head's number rows here and writes each slot's box with it (`SceneSlots(box_code="number")`), so
    that writing coordinate k is one linear map shared by all 1000 numbers: measured, greedy grounding from slots
    0.90 after 300 grounding steps where learnt bins with random rows stayed at 0.03-0.20 (docs/probes/README.md,
    stop 41, nc1 against sg3)."""
    centres = (torch.arange(dim, dtype=torch.float64) + 0.5) * 1000 / dim
    values = torch.arange(count, dtype=torch.float64)[:, None]
    bumps = torch.exp(-0.5 * ((values - centres) / (1000 / dim)) ** 2)  # (count, dim)
    bumps = bumps / bumps.norm(dim=1, keepdim=True)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(hidden_size, dim, generator=generator, dtype=torch.float64))[0]  # (D, dim)
    return (bumps @ basis.T).float()  # (count, D)


def role_rotations(hidden_size: int, seed: int) -> torch.Tensor:
    """[4, D, D] fixed random rotations, one per box coordinate (x0, y0, x1, y1): the four codes of one slot then
    lie in four different subspaces, so a head can read one of them without the other three."""
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.stack([torch.linalg.qr(torch.randn(hidden_size, hidden_size, generator=generator,
                                                    dtype=torch.float64))[0] for _ in range(4)]).float()


class WordTable(nn.Module):
    """Token ids of a list of words (each as it follows a space), padded: embeds a word as the sum of its
    tokens' embeddings, which for a word the tokenizer holds whole is its one embedding."""

    def __init__(self, tokenizer, words: list[str]):
        super().__init__()
        pieces = [tokenizer.encode(" " + w, add_special_tokens=False) for w in words]
        if not all(pieces):
            raise ValueError(f"the tokenizer gives no tokens for some of {words}")
        width = max(len(p) for p in pieces)
        self.register_buffer("ids", torch.tensor([p + [0] * (width - len(p)) for p in pieces]), persistent=False)
        self.register_buffer("mask", torch.tensor([[1.0] * len(p) + [0.0] * (width - len(p)) for p in pieces]),
                             persistent=False)

    def forward(self, index: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """index long [...] into the words, embedding [V, D] -> [..., D]."""
        return (embedding[self.ids[index]] * self.mask[index][..., None].to(embedding.dtype)).sum(-2)


class SceneSlots(nn.Module):
    """Scenes -> [B, Q, D] slot vectors, given the LLM's input embedding matrix (which it shares, not owns)."""

    def __init__(self, tokenizer, hidden_size: int, grid: int = 6, box_code: str = "bins", code_seed: int = 0):
        """`code_seed`: the seed of `number_code` (box_code="number"): the one the LLM's number rows started from."""
        super().__init__()
        if box_code not in BOX_CODES:
            raise ValueError(f"SceneSlots box_code must be one of {BOX_CODES}, got {box_code!r}")
        self.grid, self.box_code = grid, box_code
        self.cell = nn.Embedding(grid * grid, hidden_size)  # what an empty cell holds: where it is
        self.colour_category = nn.Embedding(len(COLOURS) * len(CATEGORIES), hidden_size)
        self.box = nn.Embedding(4 * BOX_BINS, hidden_size)
        for table in (self.cell, self.colour_category, self.box):
            nn.init.normal_(table.weight, std=0.02)
        if box_code == "fourier":  # a coordinate's three pairs about as long as one bin embedding (~0.02 sqrt(D))
            self.box_fourier = nn.Linear(4 * 2 * len(BOX_PERIODS), hidden_size, bias=False)
            nn.init.normal_(self.box_fourier.weight, std=0.02 / len(BOX_PERIODS) ** 0.5)
        if box_code == "number":  # fixed, not learnt: [4, 1000, D], coordinate k's code turned by rotation k
            codes = NUMBER_CODE_NORM * number_code(hidden_size, code_seed)
            turned = torch.einsum("nd,ked->kne", codes, role_rotations(hidden_size, code_seed))
            self.register_buffer("box_codes", turned.contiguous())  # (safetensors saves contiguous tensors only)
        self.colours = WordTable(tokenizer, COLOURS)
        self.categories = WordTable(tokenizer, CATEGORIES)
        self.sizes = WordTable(tokenizer, list(SIZES))
        self.places = WordTable(tokenizer, [w for cell in CELLS for w in place_words(cell)])  # 2 per place
        self.counts = WordTable(tokenizer, list(COUNT_WORDS))
        # False: no count word in the slots and none read back (`base_recipe.StageSettings.slot_counts`)
        self.count_words = True

    def word_ids(self) -> torch.Tensor:
        """The first token of every colour, category, size, place and count word the slots hold (sorted, unique)."""
        tables = (self.colours, self.categories, self.sizes, self.places, self.counts)
        return torch.unique(torch.cat([table.ids[:, 0] for table in tables])).cpu()

    def _objects(self, scenes: list[S.Scene], cells: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scene index [N], `slot_features` [N, 10]) of every object of the batch (`cells`: per scene, its objects'
        cells, as `assign_cells` gives them)."""
        rows, feats = [], []
        for i, scene in enumerate(scenes):
            for f in slot_features(scene, self.grid, None if cells is None else cells[i]):
                rows.append(i)
                feats.append(f)
        device = self.cell.weight.device
        return (torch.tensor(rows, dtype=torch.long, device=device),
                torch.tensor(feats, dtype=torch.long, device=device).reshape(-1, 10))

    @staticmethod
    def _boxes(scenes: list[S.Scene], device) -> torch.Tensor:
        """[N, 4] every object's box on the unpadded 0-1000 grid, in the order of `_objects`."""
        return torch.tensor([pixel_to_grid(o.bbox, s.width, s.height, square_pad=False) for s in scenes
                             for o in s.objects], device=device).reshape(-1, 4)

    def _box_part(self, scenes: list[S.Scene], bins: torch.Tensor) -> torch.Tensor:
        """[N, D]: every object's box, from its corner bins [N, 4], (fourier) its coordinates' phases or (number) the
        sum of its coordinates' turned codes."""
        if self.box_code == "bins":
            return self.box(bins + torch.arange(4, device=bins.device) * BOX_BINS).sum(1)
        boxes = self._boxes(scenes, bins.device)
        if self.box_code == "number":
            picked = self.box_codes[torch.arange(4, device=bins.device), boxes.clamp(0, 999)]  # (N, 4, D)
            return picked.sum(1)  # (N, D)
        return self.box_fourier(box_phases(boxes).to(self.box_fourier.weight.dtype))

    def _contents(self, scenes: list[S.Scene], tokens: torch.Tensor,
                  cells: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(`slot_features` [N, 10], each object's cell token [N, D] with the cell's own vector removed) from the
        image tokens [B, Q, D]."""
        rows, f = self._objects(scenes, cells)
        return f, tokens[rows, f[:, 0]] - self.cell.weight[f[:, 0]]

    def readout_loss(self, scenes: list[S.Scene], tokens: torch.Tensor, word_embedding: torch.Tensor,
                     cells: list | None = None) -> torch.Tensor:
        """Mean cross-entropy of reading each object's colour, category and (`count_words`) count word back from its
        cell's token ([B, Q, D], the cell's own vector removed) by dot products with the candidate words' embeddings:
        the parts of a slot the questions read, which a plain regression of the whole slot leaves out (measured)."""
        f, content = self._contents(scenes, tokens, cells)  # (N, 10), (N, D)
        losses = []
        tables = ((self.colours, 1), (self.categories, 2)) + (((self.counts, 9),) if self.count_words else ())
        for table, column in tables:
            words = table(torch.arange(len(table.ids), device=f.device), word_embedding)  # (n, D)
            # in units of a word's squared norm: a slot holding the word scores ~4 on it (as is, the true slots
            # read back at a loss of 1.83 against chance's 1.99: too flat to teach anything)
            logits = READOUT_SCALE * (content.float() @ words.float().T) / words.float().pow(2).sum(-1).mean()
            losses.append(F.cross_entropy(logits, f[:, column]))
        return torch.stack(losses).mean()

    def census_loss(self, scenes: list[S.Scene], tokens: torch.Tensor, word_embedding: torch.Tensor,
                    cells: list | None = None) -> torch.Tensor:
        """Cross-entropy over every cell's token ([B, Q, D], the cell's own vector removed): empty, or the category
        of the object centred there, by the same dot products as `readout_loss` against a fixed "empty" logit halfway
        to a held word's score. `readout_loss` reads object cells only, so nothing stops a cell beside an object from
        holding its category too; a count of cells then counts such ghosts (a linear probe over course21's tuned
        tokens: 98 % of empty cells empty, but under 0.6 of object cells told apart from their neighbours)."""
        rows, f = self._objects(scenes, cells)
        content = tokens - self.cell.weight[None]  # (B, Q, D)
        words = self.categories(torch.arange(len(self.categories.ids), device=tokens.device), word_embedding).float()
        scores = CENSUS_SCALE * (content.float() @ words.T) / words.pow(2).sum(-1).mean()  # (B, Q, categories)
        empty = torch.full_like(scores[..., :1], CENSUS_SCALE / 2)
        targets = torch.zeros(tokens.shape[:2], dtype=torch.long, device=tokens.device)  # (B, Q): 0 = empty
        targets[rows, f[:, 0]] = 1 + f[:, 2]
        return F.cross_entropy(torch.cat([empty, scores], -1).flatten(0, 1), targets.flatten())

    def box_readout_loss(self, scenes: list[S.Scene], tokens: torch.Tensor, cells: list | None = None) -> torch.Tensor:
        """box_code="number": mean cross-entropy of reading each object's four coordinates back from its cell's token
        ([B, Q, D]) by dot products with each coordinate's 1000 codes. A loss of its own (`StageSettings.
        box_readout_weight`): inside `readout_loss` (4 of its 7 terms) it kept align's yes/no from pixels at .50
        after 1,500 steps, where on its own at 0.25 the same align reached .72; either way the coordinates stay near
        chance there (5.95 of 6.91; docs/probes/README.md, stop 41, a11 / a11b)."""
        if self.box_code != "number":
            raise ValueError(f"the box read-back reads the number code; these slots hold box_code={self.box_code!r}")
        f, content = self._contents(scenes, tokens, cells)  # (N, 10), (N, D)
        boxes = self._boxes(scenes, f.device).clamp(0, 999)
        losses = []
        for k in range(4):
            logits = BOX_READOUT_SCALE * (content.float() @ self.box_codes[k].T) / NUMBER_CODE_NORM ** 2  # (N, 1000)
            losses.append(F.cross_entropy(logits, boxes[:, k]))
        return torch.stack(losses).mean()

    def forward(self, scenes: list[S.Scene], word_embedding: torch.Tensor, cells: list | None = None) -> torch.Tensor:
        batch = len(scenes)
        out = self.cell.weight[None].repeat(batch, 1, 1)  # (B, Q, D)
        rows, f = self._objects(scenes, cells)
        if not len(rows):
            return out
        vectors = (self.colours(f[:, 1], word_embedding) + self.categories(f[:, 2], word_embedding)
                   + self.sizes(f[:, 3], word_embedding)
                   + self.places(2 * f[:, 8:9] + torch.arange(2, device=f.device), word_embedding).sum(1)
                   + (self.counts(f[:, 9], word_embedding) if self.count_words else 0.0)
                   + self.colour_category(f[:, 1] * len(CATEGORIES) + f[:, 2])
                   + self._box_part(scenes, f[:, 4:8]))  # (N, D)
        return out.index_put((rows, f[:, 0]), vectors.to(out.dtype), accumulate=True)


def assign_cells(slots: SceneSlots, scenes: list[S.Scene], tokens: torch.Tensor, targets: torch.Tensor,
                 tolerance: float) -> list[tuple[int, ...]]:
    """Per scene, its objects' cells for this batch's targets: an object whose centre lies within `tolerance` cells
    of a border (`border_neighbours`) is put across it when the image tokens [B, Q, D] already hold it there (the
    slot error of the two cells smaller that way), provided it is alone in its cell and the neighbour holds nothing.
    A count of cells needs every object in exactly one of them, not in the one a line a few pixels away picks:
    measured on course23's align, 286 of 381 cells that held an object not theirs had its centre within 0.1 cells
    of their border. `targets`: the scenes' slot vectors [B, Q, D] with every object in its own cell (`slots`' forward
    without `cells`). The choice is made without gradient; the losses then use it (slots, read-backs, census, heads)."""
    out = []
    with torch.no_grad():
        targets, tokens = targets.float(), tokens.float()
        for b, scene in enumerate(scenes):
            own = [f[0] for f in slot_features(scene, slots.grid)]
            held = Counter(own)
            cells = list(own)
            for i, across in enumerate(border_neighbours(scene, slots.grid, tolerance)):
                if across is None or held[own[i]] > 1 or held[across] or across in cells:
                    continue
                vector = targets[b, own[i]] - slots.cell.weight[own[i]]  # the object's part of its slot
                here = ((tokens[b, own[i]] - targets[b, own[i]]) ** 2).sum() + \
                    ((tokens[b, across] - slots.cell.weight[across]) ** 2).sum()
                there = ((tokens[b, own[i]] - slots.cell.weight[own[i]]) ** 2).sum() + \
                    ((tokens[b, across] - slots.cell.weight[across] - vector) ** 2).sum()
                if there < here:
                    cells[i] = across
            out.append(tuple(cells))
    return out
