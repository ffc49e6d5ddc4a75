"""Probe: LLM pretraining on scenes given as oracle slot vectors in the image-token positions (36 = 6x6 cells)."""
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from mllm.world import scenes as S
from mllm.data.boxes import format_box, pixel_to_grid
from mllm.data.conversation import conversation_to_ids, place_images
from mllm.data.grounding_prepare import GROUNDING_PROMPT
# turn makers the product's lessons share with these probes (same texts, same random draws)
from mllm.data.lessons import box_list, grounding_turn
from mllm.data.lessons import lookup_turn as lookup_qa
from mllm.model.configuration import MLLMConfig
from mllm.model.llm import LLMForCausalLM
from mllm.model.tokenization import load_tokenizer, special_token_ids

args = dict(a.split("=") for a in sys.argv[1:] if "=" in a)
STEPS = int(args.get("steps", 3000))
BATCH = int(args.get("batch", 32))
LR = float(args.get("lr", 1e-3))
TURNS = int(args.get("turns", 4))
GRID = int(args.get("grid", 6))
LAYERS = int(args.get("layers", 4))
BF16 = args.get("bf16", "0") == "1"
OUT = args.get("out", "runs/probe/s1")
AUXW = float(args.get("aux", 1.0))
TIE = args.get("tie", "0") == "1"  # colour / category / size parts of a slot = the LLM's own word embeddings
CELLW = args.get("cellw", "0") == "1"  # with tie: the slot also holds the words of its 3x3 place ("top", "left")
CNTW_MODE = args.get("cntw", "0")  # with tie: 1 = the k-th object of a category (raster order) holds the word of k;
CNTW = CNTW_MODE in ("1", "total")  # total = every object holds the word of its category's count
torch.set_num_threads(int(args.get("threads", 1)))
torch.manual_seed(0)

tok = load_tokenizer("mllm/assets/tiny-base")
tids = special_token_ids(tok)
Q = GRID * GRID
cfg = MLLMConfig.from_preset("tiny").llm
cfg.vocab_size = len(tok)
cfg.num_hidden_layers = LAYERS
cfg.max_window_layers = LAYERS
llm = LLMForCausalLM(cfg)
D = cfg.hidden_size
COLS, CATS = list(S.COLOURS), list(S.CATEGORIES)
NB = 25


class Oracle(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(Q, D)
        self.col = nn.Embedding(len(COLS), D)
        self.cat = nn.Embedding(len(CATS), D)
        self.cs = nn.Embedding(len(COLS) * len(CATS), D)
        self.size = nn.Embedding(3, D)
        self.box = nn.Embedding(4 * NB, D)
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, slots):  # slots: list per sample of list of (cell, col, cat, size, b0..b3)
        out = self.pos.weight[None].repeat(len(slots), 1, 1)  # (B, Q, D)
        rows, cells, feats = [], [], []
        for i, objs in enumerate(slots):
            for o in objs:
                rows.append(i); cells.append(o[0]); feats.append(o[1:])
        if rows:
            f = torch.tensor(feats)
            if TIE:
                emb = llm.get_input_embeddings().weight
                v = emb[COL_IDS[f[:, 0]]] + emb[CAT_IDS[f[:, 1]]] + emb[SIZE_IDS[f[:, 2]]] + self.cs(
                    f[:, 0] * len(CATS) + f[:, 1]) + self.box(f[:, 3:7] + torch.arange(4) * NB).sum(1)
                if CELLW:
                    v = v + emb[PLACE_IDS[f[:, 7]]].sum(1)
                if CNTW:
                    v = v + emb[NUM_IDS[f[:, 8]]]
            else:
              v = self.col(f[:, 0]) + self.cat(f[:, 1]) + self.cs(f[:, 0] * len(CATS) + f[:, 1]) + self.size(f[:, 2]) \
                + self.box(f[:, 3:7] + torch.arange(4) * NB).sum(1)
            out = out.index_put((torch.tensor(rows), torch.tensor(cells)), v, accumulate=True)
        return out


oracle = Oracle()
SIZES = ("small", "medium-sized", "large")
COL_IDS = torch.tensor([tok.encode(" " + w, add_special_tokens=False)[0] for w in COLS])
CAT_IDS = torch.tensor([tok.encode(" " + w, add_special_tokens=False)[0] for w in CATS])
SIZE_IDS = torch.tensor([tok.encode(" " + w, add_special_tokens=False)[0] for w in SIZES])
_CELLS = sorted(S.CELL_PHRASES)
_words = [[w for w in S.CELL_PHRASES[c].split() if w not in ("in", "the", "at", "on")] for c in _CELLS]
PLACE_IDS = torch.tensor([[tok.encode(" " + w, add_special_tokens=False)[0] for w in (ws * 2)[:2]] for ws in _words])
NUM_IDS = torch.tensor([tok.encode(" " + w, add_special_tokens=False)[0] for w in ("one", "two", "three", "four", "five", "six")])


def optimizer(params, beta2: float, warmup: int):
    """AdamW with linear warm-up and cosine decay to zero over STEPS."""
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, beta2), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / STEPS))))
    return opt, sched


def make_scene(rng):
    scene = S.sample_scene(rng, "x")
    drawn = []
    for o in scene.objects:
        mask, ox, oy = S.draw_object_mask(o)
        x0, y0, x1, y1 = mask.point(S._COVERED).getbbox()
        drawn.append(S.dataclasses.replace(o, bbox=(max(0, ox + x0), max(0, oy + y0), min(scene.width, ox + x1),
                                                    min(scene.height, oy + y1))))
    drawn.sort(key=lambda o: S.raster_key(o, scene.width, scene.height))
    return S.dataclasses.replace(scene, objects=tuple(drawn))


def slots_of(scene):
    out = []
    seen = Counter()
    totals = Counter(o.category for o in scene.objects)
    for o in scene.objects:
        seen[o.category] += 1
        cx, cy = S.centre(o)
        cell = min(GRID - 1, int(GRID * cy / scene.height)) * GRID + min(GRID - 1, int(GRID * cx / scene.width))
        g = pixel_to_grid(o.bbox, scene.width, scene.height, square_pad=False)
        b = [min(NB - 1, v * NB // 1000) for v in g]
        out.append((cell, COLS.index(o.colour), CATS.index(o.category),
                    SIZES.index(S.size_word(o, scene.width, scene.height)), *b,
                    _CELLS.index(S.grid_cell(o, scene.width, scene.height)),
                    min(5, (totals[o.category] if CNTW_MODE == "total" else seen[o.category]) - 1)))
    return out


MIX = args.get("mix", "base")
STMT_LAST = args.get("stmt_last", "0") == "1"


def inventory(scene, rng):
    """Dense lookups: each category word is followed by whether the scene holds it."""
    counts = S._counts(scene)
    cats = list(S.CATEGORIES)
    rng.shuffle(cats)
    return "Which shapes are in the image?", " , ".join(f"{c} {'yes' if c in counts else 'no'}" for c in cats) + " ."


def statements(scene, rng, kinds=("existence", "color", "count", "position")):
    """Dense lookups shaped like the yes/no questions: each statement is followed by whether it is true."""
    counts = S._counts(scene)
    absent = [c for c in S.CATEGORIES if c not in counts]
    items = []
    for cat in rng.sample(sorted(counts), min(2, len(counts))):
        items.append(f"a {cat} yes")
    for cat in rng.sample(absent, min(2, len(absent))):
        items.append(f"a {cat} no")
    for o in rng.sample(scene.objects, min(2, len(scene.objects)) if "color" in kinds else 0):
        used = {x.colour for x in scene.objects if x.category == o.category}
        other = [c for c in S.COLOURS if c not in used]
        items.append(f"a {o.colour} {o.category} yes")
        if other:
            items.append(f"a {rng.choice(other)} {o.category} no")
    for cat in rng.sample(sorted(counts), min(2, len(counts)) if "count" in kinds else 0):
        right = counts[cat]
        wrong = right + 1 if right == 1 or rng.random() < 0.5 else right - 1
        items.append(f"{S.number_phrase(right, cat)} yes")
        items.append(f"{S.number_phrase(wrong, cat)} no")
    uniques = S._unique_colour_category(scene)
    for o in rng.sample(uniques, min(2, len(uniques)) if "position" in kinds else 0):
        row, col = S.grid_cell(o, scene.width, scene.height)
        far = rng.choice([cell for cell in S.CELL_PHRASES if cell[0] != row and cell[1] != col])
        items.append(f"the {o.colour} {o.category} {S.CELL_PHRASES[(row, col)]} yes")
        items.append(f"the {o.colour} {o.category} {S.CELL_PHRASES[far]} no")
    rng.shuffle(items)
    return "Which of these are in the image?", " " + " , ".join(items) + " ."


def stmt_and_boxes(scene, rng):
    return statements(scene, rng) if rng.random() < 0.5 else box_list(scene, rng)


def yesno_turn(scene, rng, kinds=None):
    """One question of a yes/no pair (of one of `kinds`, when given)."""
    while True:
        kind, pair = S.yesno_pair(scene, rng)
        if kinds is None or kind in kinds:
            return rng.choice(pair)


def short_turn(scene, rng):
    return rng.choice(S.SHORT_PROMPTS), S.short_description(S.scene_mentions(scene, rng))


def detailed_turn(scene, rng):
    return (rng.choice(S.DETAILED_PROMPTS),
            S.detailed_description(S.scene_mentions(scene, rng, S.SYNONYM_P), rng.randrange(2)))


def dialogue_turn(scene, rng):
    return S.dialogue(scene, rng)[1]


# mix -> (first turn or None, [(weight, turn maker)])
MIXES = {
    "base": (None, [(0.45, yesno_turn), (0.10, S.counting_qa), (0.07, short_turn), (0.10, detailed_turn),
                    (0.15, grounding_turn), (0.13, dialogue_turn)]),
    "lookup": (None, [(0.35, yesno_turn), (0.35, lookup_qa), (0.08, short_turn), (0.08, detailed_turn),
                      (0.14, grounding_turn)]),
    "exist": (None, [(1.0, lambda sc, r: yesno_turn(sc, r, ("existence",)))]),
    "exinv": (inventory, [(1.0, lambda sc, r: yesno_turn(sc, r, ("existence",)))]),
    "yninv": (statements, [(1.0, yesno_turn)]),
    # curriculum step 2: existence and colour statements and questions (start from an existence run: init=)
    "excol": (lambda sc, r: statements(sc, r, ("existence", "color")),
              [(1.0, lambda sc, r: yesno_turn(sc, r, ("existence", "color")))]),
    # descriptions and grounding weighted up (does the LLM learn to traverse the slots and read their boxes?)
    "desc": (statements, [(0.35, yesno_turn), (0.1, lookup_qa), (0.1, short_turn), (0.2, detailed_turn),
                          (0.25, grounding_turn)]),
    # as desc with the questions weighted up
    "desc2": (statements, [(0.5, yesno_turn), (0.15, lookup_qa), (0.05, short_turn), (0.15, detailed_turn),
                           (0.15, grounding_turn)]),
    # grounding weighted up, with a dense box-listing turn (in place of the statements turn half of the time)
    "ground": (stmt_and_boxes, [(0.3, yesno_turn), (0.1, short_turn), (0.1, detailed_turn), (0.5, grounding_turn)]),
    "full": (statements, [(0.5, yesno_turn), (0.15, lookup_qa), (0.07, short_turn), (0.08, detailed_turn),
                          (0.2, grounding_turn)]),
}


def turns_of(scene, rng, n, mix=None):
    """n (question, answer) turns about one scene, drawn from the mix named by `mix=` (or `mix`)."""
    first, table = MIXES[mix or MIX]
    turns = [first(scene, rng)] if first else []
    weights, makers = [w for w, _ in table], [m for _, m in table]
    while len(turns) < n:
        turn = rng.choices(makers, weights)[0](scene, rng)
        if turn is not None:
            turns.append(turn)
    if STMT_LAST and first:
        # the statements turn after the questions: a question can no longer be answered by copying a statement
        turns = turns[1:] + turns[:1]
    if ORDER == "ask_first":
        # turns that ask about the scene, then the statements, then the turns that write it out (descriptions,
        # boxes): no lookup can be answered by copying words an earlier turn revealed
        turns = sorted(turns, key=_turn_rank)
    return turns


ORDER = args.get("order", "mix")
_REVEALS = set(S.SHORT_PROMPTS) | set(S.DETAILED_PROMPTS)


def _turn_rank(turn):
    question = turn[0]
    if question in ("Which of these are in the image?", "Which shapes are in the image?"):
        return 1
    if question in _REVEALS or question.startswith(GROUNDING_PROMPT.split("{")[0]) or question == "Where is each object?":
        return 2
    return 0

TEXT = args.get("text", "0") == "1"  # control: the scene written as words instead of slot vectors


def scene_text(scene):
    return "Scene : " + " ; ".join(f"{o.colour} {o.category} {S.CELL_PHRASES[S.grid_cell(o, scene.width, scene.height)]}"
                                   for o in scene.objects) + " ."


def encode(turns, scene=None):
    if TEXT:
        conv = []
        for k, (q, a) in enumerate(turns):
            conv += [{"role": "user", "content": (scene_text(scene) + "\n" if k == 0 else "") + q},
                     {"role": "assistant", "content": a}]
        out = conversation_to_ids(conv, tok, token_ids=tids)
        out["image_bound"] = torch.tensor([[1, 1]])
        return out
    conv = []
    for k, (q, a) in enumerate(turns):
        conv += [{"role": "user", "content": ("<image>\n" if k == 0 else "") + q}, {"role": "assistant", "content": a}]
    conv, _ = place_images(conv, {"<image>": None}, Q)
    return conversation_to_ids(conv, tok, query_num=Q, token_ids=tids)


def batch_of(items):
    L = -(-max(len(x["input_ids"]) for x in items) // 32) * 32  # few distinct shapes: oneDNN caches per shape
    B = len(items)
    ids = torch.full((B, L), tids["pad"] if tids.get("pad") is not None else 0, dtype=torch.long)
    lab = torch.full((B, L), -100, dtype=torch.long)
    aux = torch.full((B, L), -100, dtype=torch.long)
    att = torch.zeros(B, L, dtype=torch.long)
    starts = []
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n] = x["input_ids"]; lab[i, :n] = x["labels"]; att[i, :n] = 1
        a = torch.full((n,), -100, dtype=torch.long)
        a[:-1] = x["input_ids"][1:]
        s, e = (int(v) for v in x["image_bound"][0])
        if not TEXT:
            a[s - 1:e] = -100  # image slots are not predicted
        aux[i, :n] = a
        starts.append(s)
    return ids, lab, aux, att, starts


def forward(ids, att, starts, slots):
    emb = llm.get_input_embeddings()(ids)
    if TEXT:
        return llm(inputs_embeds=emb, attention_mask=att).logits
    vec = oracle(slots)  # (B, Q, D)
    idx_r = torch.arange(len(starts))[:, None].expand(-1, Q)
    idx_c = torch.tensor(starts)[:, None] + torch.arange(Q)
    emb = emb.index_put((idx_r, idx_c), vec)
    return llm(inputs_embeds=emb, attention_mask=att).logits


# ---- held-out evaluation -------------------------------------------------------------------------------------
erng = random.Random("heldout/stage1")
EVAL = []
for _ in range(400):
    sc = make_scene(erng)
    kind, pair = S.yesno_pair(sc, erng)
    for q, a in pair:
        EVAL.append((kind, sc, q, a))
YES, NO = tok.encode("Yes", add_special_tokens=False)[0], tok.encode("No", add_special_tokens=False)[0]


@torch.no_grad()
def evaluate():
    llm.eval()
    hits = defaultdict(list)
    for k in range(0, len(EVAL), 100):
        chunk = EVAL[k:k + 100]
        items = [encode([(q, a)], sc) for _, sc, q, a in chunk]
        ids, lab, aux, att, starts = batch_of(items)
        with torch.autocast("cpu", torch.bfloat16, enabled=BF16):
            logits = forward(ids, att, starts, [slots_of(sc) for _, sc, _, _ in chunk]).float()
        for i, (kind, _, _, a) in enumerate(chunk):
            pos = int(((lab[i] == YES) | (lab[i] == NO)).nonzero()[0])
            pred = "Yes" if logits[i, pos, YES] > logits[i, pos, NO] else "No"
            hits[kind].append(pred == a)
    llm.train()
    res = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    res["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return res




def read_chain(base, folders, box_code="bins", **model_kwargs):
    """(model, tokenizer, slots) of a course run's phase 0 with the LLM and slots of finished read-kind stage
    folders loaded over it in order (e.g. RUN/base/read, RUN/base/bind, RUN/base/settle); an empty list gives the
    phase-0 model with the seeded starting slots. `folders == "init"` starts from the run's random init instead, and
    so does a first entry "init" (stages trained from init, d0). An entry "grow:N" deepens the LLM at that point
    (`grow_llm`), before the folders after it are loaded."""
    from pathlib import Path

    from mllm.course.base import _slots
    from mllm.model.modeling_mllm import MLLMModel
    from mllm.train.base_recipe import BaseStage, StageSettings

    from_init = folders == "init" or (len(folders) > 0 and str(folders[0]) == "init")
    folders = [] if folders == "init" else [f for f in folders if str(f) != "init"]
    start = Path(base) / ("init" if from_init else "phase0")
    tokenizer = load_tokenizer(start)
    model = MLLMModel.from_pretrained(start, **model_kwargs)
    slots = _slots(tokenizer, model, 0, box_code)  # box_code="number": a course run with Budget.box_code="number"
    finished = StageSettings(kind="read", steps=1, lr=1e-3, trains={"llm": 1.0, "slots": 1.0}, eval_scenes=1)
    for folder in folders:
        if str(folder).startswith("grow:"):  # e.g. grow:4: the LLM deepened here, before the folders that follow
            grow_llm(model, int(str(folder)[5:]))
            continue
        BaseStage(model, tokenizer, slots, finished, Path(folder)).load_finished()
    return model, tokenizer, slots


def grow_llm(model, extra: int) -> None:
    """Deepen a finished LLM by `extra` decoder layers that start as the identity (output projections zero, so
    each adds nothing to the residual stream until it learns): one after each of the first `extra` layers. Does a
    deeper LLM find the next object of a description (slot_retrieval.py next), where 4 layers did not?"""
    import torch

    from mllm.model.llm import LLMDecoderLayer

    llm = model.llm.model
    config = llm.config
    old = list(llm.layers)
    if extra > len(old):
        raise ValueError(f"grow:{extra}: at most one new layer after each of the {len(old)}")
    grown = []
    for i, layer in enumerate(old):
        grown.append(layer)
        if i < extra:
            new = LLMDecoderLayer(config, 0).to(next(layer.parameters()).dtype)
            new.load_state_dict(layer.state_dict())  # norms and projections at a trained layer's scale
            with torch.no_grad():
                new.self_attn.o_proj.weight.zero_()
                new.mlp.down_proj.weight.zero_()
            grown.append(new)
    for i, layer in enumerate(grown):  # the KV cache indexes layers by position
        layer.self_attn.layer_idx = i
    llm.layers = torch.nn.ModuleList(grown)
    config.num_hidden_layers = config.max_window_layers = len(grown)


def band_major_slots(grid: int = 6) -> None:
    """Patch `SceneSlots.forward` so the G x G slots come band-major, as descriptions list objects: the 3x3 grid's
    row bands first (two slot rows each for G = 6), then by column, the band's two slot rows side by side. In the
    plain row-major order an object in a band's lower slot row comes after every object of its upper row, while a
    description (`raster_key`: row band, then the centre's x) may name it first."""
    import torch

    from mllm.train import scene_slots as SS

    rows_per_band = grid // 3
    order = [row * grid + col for band in range(3) for col in range(grid)
             for row in range(band * rows_per_band, (band + 1) * rows_per_band)]
    plain = SS.SceneSlots.forward

    def forward(self, scenes, word_embedding):
        return plain(self, scenes, word_embedding)[:, torch.tensor(order)]  # (B, Q, D), sequence position = order

    SS.SceneSlots.forward = forward


def compact_slots(grid: int = 6) -> None:
    """Patch `SceneSlots.forward` so each scene's occupied slots come first, in the order descriptions name the
    objects (`raster_key`), then the empty ones row-major. Every slot keeps its content (its cell's vector, the
    object's words and place); only the sequence order changes, so that the object after the one just named sits
    in the next occupied slot with no empty slot between: the step an induction head makes."""
    import torch

    from mllm.train import scene_slots as SS

    plain = SS.SceneSlots.forward

    def forward(self, scenes, word_embedding):
        out = plain(self, scenes, word_embedding)  # (B, Q, D), row-major
        orders = []
        for scene in scenes:
            named = sorted(zip(scene.objects, SS.slot_features(scene, grid)),
                           key=lambda pair: S.raster_key(pair[0], scene.width, scene.height))
            cells = list(dict.fromkeys(f[0] for _, f in named))  # two objects may share a slot
            orders.append(cells + [c for c in range(grid * grid) if c not in cells])
        index = torch.tensor(orders, device=out.device)[..., None].expand(-1, -1, out.shape[-1])  # (B, Q, D)
        return out.gather(1, index)

    SS.SceneSlots.forward = forward


def extra_slot_table(table: str, std: float = 0.0) -> None:
    """Patch `SceneSlots` with one more learnt vector added to each object's slot: "triple", one per (colour,
    category, 3x3 place) (zero-initialised), or "rank", one per object's rank in description order (first ..
    sixth; normal with `std`). Slot states saved before the table existed still load (the table keeps its start)."""
    import torch
    from torch import nn

    from mllm.train import scene_slots as SS

    size = len(SS.COLOURS) * len(SS.CATEGORIES) * len(SS.CELLS) if table == "triple" else 6
    plain_init, plain_forward, plain_load = SS.SceneSlots.__init__, SS.SceneSlots.forward, SS.SceneSlots.load_state_dict

    def init(self, tokenizer, hidden_size, grid=6):
        plain_init(self, tokenizer, hidden_size, grid)
        self.extra = nn.Embedding(size, hidden_size)
        nn.init.normal_(self.extra.weight, std=std) if std > 0 else nn.init.zeros_(self.extra.weight)

    def forward(self, scenes, word_embedding):
        out = plain_forward(self, scenes, word_embedding)
        rows, f = self._objects(scenes)
        if not len(rows):
            return out
        if table == "triple":
            index = (f[:, 1] * len(SS.CATEGORIES) + f[:, 2]) * len(SS.CELLS) + f[:, 8]
        else:  # objects come scene by scene in raster order (`SceneSlots._objects`): the k-th of its scene
            index = torch.tensor([k for scene in scenes for k in range(len(scene.objects))], device=f.device)
        return out.index_put((rows, f[:, 0]), self.extra(index).to(out.dtype), accumulate=True)

    def load_state_dict(self, state, strict=True, assign=False):
        state = dict(state)
        if "pair_place.weight" in state:  # t1, t1b: saved by this probe's first version, under the table's old name
            state["extra.weight"] = state.pop("pair_place.weight")
        state.setdefault("extra.weight", self.extra.weight.detach().clone())
        return plain_load(self, state, strict, assign)

    SS.SceneSlots.__init__, SS.SceneSlots.forward, SS.SceneSlots.load_state_dict = init, forward, load_state_dict


def first_digit_head(stage, head: int, layer: int) -> None:
    """g2: query head `head` of decoder layer `layer` (with its own key/value head) taught to attend to the referred
    object's cell only where a grounding answer's first digit (x0's leading digit) is written, and to the sequence's
    first token elsewhere in the box; that digit read from this head's output alone (its share of the output
    projection, the final norm, the LM head). Where the role is selected by the query, the read is additive, as a
    word's is: does the first corner's digit then come from the image? Replaces the stage's box read (logged as
    read_box) and adds to its pointer loss."""
    import torch.nn.functional as F

    from mllm.train.stage_heads import head_output, head_scores, pointer_targets

    original = stage._pointer_loss
    open_bracket = stage.tokenizer.encode("[", add_special_tokens=False)[0]
    digits = {stage.tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)}

    def with_first_digit(scenes, conversations, batch, hidden):
        out = original(scenes, conversations, batch, hidden)
        rows, at, targets, first = [], [], [], []
        for b, (scene, conversation) in enumerate(zip(scenes, conversations)):
            ids = batch["input_ids"][b].tolist()
            for position, cell in pointer_targets(scene, conversation, ids, stage.tokenizer, stage.slots.grid, True):
                is_first = ids[position] == open_bracket and ids[position + 1] in digits
                in_box = ids[position + 1] in digits
                if in_box:
                    rows.append(b), at.append(position), first.append(is_first)
                    targets.append(int(batch["image_starts"][b]) + cell if is_first else 0)
        if not any(first):
            return out
        rows, at, targets, first = (torch.tensor(v, device=hidden.device) for v in (rows, at, targets, first))
        attention = stage.model.llm.model.layers[layer].self_attn
        x = stage.model.llm.model.layers[layer].input_layernorm(hidden)  # (B, T, D)
        scores = head_scores(stage.model.llm, layer, x, batch, rows, at, head)  # (N, T)
        out["pointer"] = out.get("pointer", 0.0) + F.cross_entropy(scores, targets)
        written = head_output(attention, attention.v_proj(x), rows[first], scores[first], head)  # (n, D)
        logits = stage.model.llm.lm_head(stage.model.llm.model.norm(written)).float()
        out["read_box"] = F.cross_entropy(logits, batch["input_ids"][rows[first], at[first] + 1])
        return out

    stage._pointer_loss = with_first_digit


NUMBER_CODE_DIM = 32  # stop 41: Gaussian bumps along 0-1000, one per ~31 units


def number_code_features(values: torch.Tensor, dim: int = NUMBER_CODE_DIM) -> torch.Tensor:
    """[...] coordinates on the 0-1000 grid -> [..., dim] unit vectors of Gaussian bumps (centres every 1000 / dim,
    width the same): neighbouring numbers share most of their code, so what is learnt for one holds for its
    neighbours."""
    centres = (torch.arange(dim, dtype=torch.float32) + 0.5) * 1000 / dim
    bumps = torch.exp(-0.5 * ((values.float()[..., None] - centres) / (1000 / dim)) ** 2)
    return bumps / bumps.norm(dim=-1, keepdim=True)


def number_code(model, tokenizer, slots, seed: int = 0, dim: int = NUMBER_CODE_DIM, head_rows: bool = True):
    """Stop 41 (nc1): the box as the number tokens' own code. The LM head's rows of the whole-number tokens 0..999
    become alpha * U phi(n) (U [D, dim] orthonormal, phi `number_code_features`, alpha their mean norm before), and
    each slot's box part becomes gamma * sum_k P_k U phi(v_k) (P_k a fixed random rotation per coordinate, gamma a
    colour word's input-embedding norm): reading coordinate k is then one linear map shared by every number (P_k's
    inverse), where the bins left 25 x 1000 (bin, token) pairs to be matched one by one. `head_rows=False` leaves
    the LM head as loaded (a run that already has the code in it)."""
    from mllm.train.stage_heads import whole_number_ids

    hidden = model.config.llm.hidden_size
    numbers = whole_number_ids(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(hidden, dim, generator=generator))[0]  # (D, dim)
    rotations = [torch.linalg.qr(torch.randn(hidden, hidden, generator=generator))[0] for _ in range(4)]
    codes = number_code_features(torch.arange(1000)) @ basis.T  # (1000, D), unit rows
    head = model.llm.lm_head.weight
    if head_rows:
        with torch.no_grad():
            alpha = head[numbers].norm(dim=-1).mean()
            head[numbers] = (alpha * codes).to(head.dtype)
    embedding = model.llm.get_input_embeddings().weight
    gamma = float(slots.colours(torch.arange(len(slots.colours.ids)), embedding.detach()).norm(dim=-1).mean())
    per_role = torch.stack([gamma * codes @ rotation.T for rotation in rotations])  # (4, 1000, D)

    def box_part(scenes, bins):
        boxes = slots._boxes(scenes, "cpu").clamp(0, 999)  # (N, 4)
        return per_role[torch.arange(4), boxes].sum(1).to(bins.device)  # (N, D)

    slots._box_part = box_part
    return gamma, float(alpha) if head_rows else None


def number_rows_at(model, tokenizer, norm: float, seed: int = 0) -> tuple[float, float]:
    """Stop 41 (nc3): the LM head's number rows set to their mean (the offset every row shares) plus `norm` times the
    product's `scene_slots.number_code`. Returns (the code's norm before, as the rows' deviation from their mean, the
    shared offset's norm)."""
    from mllm.train.scene_slots import number_code
    from mllm.train.stage_heads import whole_number_ids

    ids = whole_number_ids(tokenizer)
    weight = model.llm.lm_head.weight
    with torch.no_grad():
        mean = weight[ids].mean(0)
        before = float((weight[ids] - mean).norm(dim=1).mean())
        weight[ids] = (mean + norm * number_code(weight.shape[1], seed)).to(weight.dtype)
    return before, float(mean.norm())
