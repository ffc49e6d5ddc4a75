"""`mllm course --stage base`: the tiny model from random init (`stage_base`): phase 0, the supervised
pretraining of a from-scratch vision tower and resampler on the synthetic world's scene labels, then the stages
of `mllm.train.base_recipe` (the LLM answers questions about scenes given as slot vectors, the image after the first
question, then learns the whole mix; vision is aligned to the slots with the LLM frozen; everything is tuned together).

The real MiniCPM-V starts from a SigLIP encoder that was pretrained on billions of image-text pairs; the tiny
course model has no such start, and a vision tower trained only through the LLM's next-token loss learns
colours and counts but barely shapes (measured: "a purple moon" x4 for one purple hexagon after 1000 steps).
This phase stands in for that pretraining, with two throwaway linear heads:

    patch head      each patch of the source view -> the shape and the colour of the object covering its
                    centre (or background): dense targets that teach the tower to see shapes locally
    resampler head  the Q resampled tokens, flattened -> for each cell of the 3x3 grid that descriptions
                    and position questions use, which shapes and which colours have an object centred there,
                    and which shape-colour pairs the image holds: what the LLM will be asked about

Targets are pure functions of a scene record (`patch_targets`, `scene_targets`); the heads are discarded.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mllm.course.polish import polish
from mllm.course.shared import Budget, answer_yesno, describe_and_score, ground_and_score, world_dir
from mllm.data.lessons import QUESTIONS_AND_STATEMENTS, LessonMix, tokenizer_texts
from mllm.jsonio import write_json_atomic
from mllm.model.configuration import MLLMConfig
from mllm.model.image_processing import ImageProcessor
from mllm.model.modeling_mllm import MLLMModel
from mllm.model.tokenization import build_tokenizer, load_tokenizer, split_numbers
from mllm.model.vision import pack_patch_strips
from mllm.train.base_recipe import BaseStage, StageSettings
from mllm.train.scene_slots import SceneSlots, number_code
from mllm.train.stage_heads import whole_number_ids
from mllm.world.corpus import tokenizer_corpus
from mllm.world.scenes import CATEGORIES, COLOURS

SHAPES = list(CATEGORIES)
COLOUR_NAMES = list(COLOURS)
GRID = 3  # the 3x3 cells of ROWS x COLUMNS
SLOT_GRID = 6  # the base reads an image as 6 x 6 = 36 tokens, one per cell of the slot grid
N_SCENE_TARGETS = GRID * GRID * (len(SHAPES) + len(COLOUR_NAMES)) + len(SHAPES) * len(COLOUR_NAMES)


def _covering(scene: dict, rows: int, cols: int) -> torch.Tensor:
    """[rows*cols]: 1 + the index of the last-drawn object whose box holds the patch's centre, 0 for none (objects
    are drawn in list order, so a later one covers an earlier one)."""
    owner = torch.zeros(rows * cols, dtype=torch.long)
    w, h = scene["width"], scene["height"]
    for k, obj in enumerate(scene["objects"]):
        x0, y0, x1, y1 = obj["bbox"]
        for i in range(rows):
            if y0 <= (i + 0.5) * h / rows <= y1:
                for j in range(cols):
                    if x0 <= (j + 0.5) * w / cols <= x1:
                        owner[i * cols + j] = k + 1
    return owner


def patch_targets(scene: dict, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape and colour class of each patch of a rows x cols view of the whole image ([rows*cols] each, row-major;
    0 = background, k = SHAPES[k-1] / COLOUR_NAMES[k-1]). A patch belongs to the last-drawn object whose box
    holds its centre (`_covering`)."""
    shapes = torch.tensor([0] + [SHAPES.index(o["category"]) + 1 for o in scene["objects"]])
    colours = torch.tensor([0] + [COLOUR_NAMES.index(o["colour"]) + 1 for o in scene["objects"]])
    owner = _covering(scene, rows, cols)
    return shapes[owner], colours[owner]


def centre_targets(scene: dict, rows: int, cols: int, grid: int = SLOT_GRID) -> torch.Tensor:
    """[rows*cols] per patch: 1 + the cell of the grid x grid slot grid that holds the centre of the object covering
    the patch's centre (the last drawn, as in `patch_targets`), 0 = background. Every patch of an object names one
    cell, the one the slots put the object in (`scene_slots.slot_features`): the tower is taught where an object's
    centre falls, which a cell's token needs so that no neighbouring cell holds the object too."""
    w, h = scene["width"], scene["height"]
    cells = [0]
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["bbox"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        cells.append(1 + min(grid - 1, int(grid * cy / h)) * grid + min(grid - 1, int(grid * cx / w)))
    return torch.tensor(cells)[_covering(scene, rows, cols)]


def scene_targets(scene: dict) -> torch.Tensor:
    """Multi-hot [N_SCENE_TARGETS]: per 3x3 cell (by object centre) the shapes, then the colours; then the
    shape-colour pairs present anywhere."""
    cells = torch.zeros(GRID, GRID, len(SHAPES) + len(COLOUR_NAMES))
    pairs = torch.zeros(len(SHAPES), len(COLOUR_NAMES))
    for obj in scene["objects"]:
        row = min(int(obj["cy"] * GRID / scene["height"]), GRID - 1)
        col = min(int(obj["cx"] * GRID / scene["width"]), GRID - 1)
        s, c = SHAPES.index(obj["category"]), COLOUR_NAMES.index(obj["colour"])
        cells[row, col, s] = 1.0
        cells[row, col, len(SHAPES) + c] = 1.0
        pairs[s, c] = 1.0
    return torch.cat([cells.flatten(), pairs.flatten()])


class PretrainHeads(nn.Module):
    def __init__(self, vision_width: int, num_queries: int, embed_dim: int, centre: bool = False):
        super().__init__()
        self.patch_shape = nn.Linear(vision_width, len(SHAPES) + 1)
        self.patch_colour = nn.Linear(vision_width, len(COLOUR_NAMES) + 1)
        self.scene = nn.Linear(num_queries * embed_dim, N_SCENE_TARGETS)
        if centre:  # made last, so that without it the other heads start as they always did
            self.patch_centre = nn.Linear(vision_width, SLOT_GRID * SLOT_GRID + 1)


def _examples(world: Path, processor: ImageProcessor, limit: int | None) -> list[dict]:
    """Source view strip, its patch grid and every target, for the world's training scenes."""
    examples = []
    with open(world / "scenes.jsonl") as f:
        scenes = [json.loads(line) for line in f if line.strip()]
    scenes = [s for s in scenes if s["split"] == "train"][:limit]
    for scene in scenes:
        views = processor(world / scene["image"])
        rows, cols = (int(v) for v in views["tgt_sizes"][0])
        shape, colour = patch_targets(scene, rows, cols)
        examples.append({"strip": views["pixel_values"][0], "size": (rows, cols), "shape": shape,
                         "colour": colour, "scene": scene_targets(scene), "centre": centre_targets(scene, rows, cols)})
    return examples


def pretrain(model, world: Path, steps: int = 1500, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
             limit: int | None = None, log_every: int = 100, scene_weight: float = 5.0,
             centre_weight: float = 0.0) -> list[dict]:
    """Train `model.vpm` and `model.resampler` in place on the world's training scenes; returns the log
    (step, loss, patch shape accuracy over non-background patches, scene-target F1). `centre_weight` > 0: a third
    patch head, each object patch's slot cell (`centre_targets`), its accuracy logged too."""
    processor = ImageProcessor.from_config(model.config.slice)
    examples = _examples(Path(world), processor, limit)
    # seeded before the heads: whether this process built the init or loaded it (a resumed run, or read-kind
    # stages that ran here first), the heads start the same (they drew from whatever came before until stop 52)
    torch.manual_seed(seed)
    heads = PretrainHeads(model.config.vision.hidden_size, model.config.query_num, model.config.llm.hidden_size,
                          centre=centre_weight > 0)
    params = list(model.vpm.parameters()) + list(model.resampler.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    torch.manual_seed(seed)  # the steps' draws as before stop 52
    model.vpm.train()
    model.resampler.train()
    log, started, cpu_started = [], time.time(), time.process_time()
    for step in range(steps):
        batch = rng.sample(examples, min(batch_size, len(examples)))
        packed, patch_mask = pack_patch_strips([e["strip"] for e in batch])  # (B, 3, 14, L), (B, 1, N_max)
        sizes = torch.tensor([e["size"] for e in batch], dtype=torch.int32)
        patches = model.vpm(packed, patch_mask, sizes)  # (B, N_max, Dv)
        resampled = model.resampler(patches, sizes)  # (B, Q, D)
        real = patches[patch_mask.flatten(1)]  # (sum N_i, Dv): view by view, row-major, as the targets concatenate
        shape_t = torch.cat([e["shape"] for e in batch])
        colour_t = torch.cat([e["colour"] for e in batch])
        shape_logits, colour_logits = heads.patch_shape(real), heads.patch_colour(real)
        scene_logits = heads.scene(resampled.flatten(1))  # (B, N_SCENE_TARGETS)
        scene_t = torch.stack([e["scene"] for e in batch])
        loss = (F.cross_entropy(shape_logits, shape_t) + F.cross_entropy(colour_logits, colour_t)
                + scene_weight * F.binary_cross_entropy_with_logits(scene_logits, scene_t))
        if centre_weight:
            centre_t = torch.cat([e["centre"] for e in batch])
            centre_logits = heads.patch_centre(real)
            loss = loss + centre_weight * F.cross_entropy(centre_logits, centre_t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            with torch.no_grad():
                fg = shape_t > 0
                shape_acc = (shape_logits.argmax(-1)[fg] == shape_t[fg]).float().mean().item()
                colour_acc = (colour_logits.argmax(-1)[fg] == colour_t[fg]).float().mean().item()
                predicted = scene_logits > 0
                tp = (predicted & (scene_t > 0)).sum().item()
                f1 = 2 * tp / max(1, predicted.sum().item() + (scene_t > 0).sum().item())
            log.append({"step": step + 1, "loss": round(loss.item(), 4), "patch_shape_acc": round(shape_acc, 3),
                        "patch_colour_acc": round(colour_acc, 3),
                        "scene_f1": round(f1, 3), "minutes": round((time.time() - started) / 60, 2),
                        **({"patch_centre_acc": round((centre_logits.argmax(-1)[fg] == centre_t[fg]).float().mean()
                                                      .item(), 3)} if centre_weight else {}),
                        "cpu_minutes": round((time.process_time() - cpu_started) / 60, 2)})
            print(f"vision pretraining {log[-1]}", flush=True)
    model.vpm.eval()
    model.resampler.eval()
    return log


def plot_log(log: list[dict], path: Path) -> None:
    """Patch shape/colour accuracy and scene-target F1 against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in log]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("patch_shape_acc", "patch shape accuracy"), ("patch_colour_acc", "patch colour accuracy"),
                       ("scene_f1", "scene targets F1 (resampler)")):
        ax.plot(steps, [entry[key] for entry in log], label=label)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.set_title("vision pretraining (training batches, foreground patches)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the stage ------------------------------------------------------------------------------------------------


def base_config(tokenizer) -> MLLMConfig:
    """The tiny preset as the base uses it: one 112-pixel view per image (no slices, so no image ids) read as
    SLOT_GRID**2 tokens, the resampler's keys at their relative place in the image (each query stands for one cell
    of the slots' grid, found at the same key positions on every image shape)."""
    config = MLLMConfig.from_preset("tiny")
    config.llm.vocab_size = len(tokenizer)
    config.query_num = SLOT_GRID * SLOT_GRID
    config.slice.max_slice_nums = 1
    config.slice.scale_resolution = config.image_size = 112
    config.use_image_id = False
    config.resampler_positions = "relative"
    return config


# ground's conversations: half are one writing turn alone, asked first (as an evaluation asks it: grounding, or a
# description at Budget.ground_describe's weight), the other half mostly grounding turns after a yes/no question and
# the statements turn, so that the yes/no answers settle reached are kept: a grounding-only phase (nc4) took the box
# from slots to 0.79 teacher-forced in 150 steps but yes/no from .94 to .82. Without the lone turns (course12's first
# ground) no grounding question ever came first, and after 200 steps none of the answers to one asked first parsed
# as a box (settle's: 0.83). The description weight is the budget's default, so that the default stage uses this mix
GROUND_MIX = LessonMix(yesno=0.35, lookup=0.0, short=0.0, detailed=Budget.ground_describe, grounding=1.0, alone=0.5)


def base_stages(budget: Budget) -> list[StageSettings]:
    """read -> settle [-> ground] -> align -> tune with the budget's steps and rates (`mllm.train.base_recipe` says what
    each kind does). Every stage puts the image after the conversation's first question and trains the match head:
    each image position says whether its cell holds an object that question asks about, so that a yes/no answer is
    one hop ("is any cell flagged") instead of two that give no gradient until both exist.

    read    the random LLM and the slot tables on yes/no questions of all four kinds plus the statements turn
            (`QUESTIONS_AND_STATEMENTS`, two turns per scene): measured 1.00 / .96 / 1.00 / 1.00 (colour / count /
            existence / position, held-out, from slots) at 1,000 steps at 1e-3, where the image first stayed at
            chance (.50/.65/.50/.50) and the question first without the head reached .52/.67/.48/.66
    settle  the full mix (descriptions, lookups, grounding; a share of conversations one writing turn alone, asked
            first) on a fresh schedule at settle_lr, slots frozen (they are what align's regression aims at): the
            yes/no numbers kept, greedy descriptions 0.30 -> 0.45 of pairs named in 300 steps
    ground  (Budget.ground_steps > 0) grounding-heavy conversations (`GROUND_MIX`), for the box heads' reading:
            greedy grounding from slots 0.233 -> 0.833 in 200 steps, yes/no .930 -> .890 (course13, stop 43)
    recount (Budget.recount_steps > 0) the LLM on read's questions and statements with no count word in the slots,
            from here on (align and tune regress slots without it): count questions answered by counting the
            question's cells, which pixels can give (count from slots .73 / .85 / .94 at 250 / 500 / 750 steps),
            then ground's steps again without it (`reground`): recount alone unlearns descriptions and boxes
    align   vision + a fresh resampler regress the slots and read back words, LLM frozen: .92/.52/.70/.80 from
            pixels after 3,000 steps (~0.3 s a step: no LLM in it)
    tune    everything, the LLM at tune_llm_lr_scale, the full mix with caption noise: .97/.65/.98/.91 after 300
    (docs/probes/README.md, "Stop 34": q0, q1, m1, m3, a2, tB; the course run end to end: "Stop 35")."""
    common = {"batch": budget.base_batch, "eval_scenes": budget.base_eval_scenes, "eval_every": budget.base_eval_every,
              "save_every": budget.base_save_every, "ground_scenes": budget.base_ground_scenes, "question_first": True,
              "match_weight": budget.match_weight}
    pointer = {"pointer_weight": budget.pointer_weight, "pointer_boxes": budget.pointer_boxes,
               "pointer_attention": budget.pointer_attention, "read_weight": budget.read_weight,
               "box_role_weight": budget.box_role_weight}
    reads = {"kind": "read", "lm_weight": 1.0, "beta2": 0.95, **common}
    ground = StageSettings(name="ground", steps=budget.ground_steps, lr=budget.ground_lr, warmup=20,
                           trains={"llm": 1.0}, mix=replace(GROUND_MIX, detailed=budget.ground_describe),
                           turns=budget.ground_turns, **pointer, **reads)
    recount = StageSettings(name="recount", steps=budget.recount_steps, lr=budget.recount_lr, warmup=50,
                            trains={"llm": 1.0}, mix=QUESTIONS_AND_STATEMENTS, turns=2, slot_counts=False, **reads)
    stages = [
        StageSettings(steps=budget.read_steps, lr=budget.read_lr, warmup=50, trains={"llm": 1.0, "slots": 1.0},
                      mix=QUESTIONS_AND_STATEMENTS, turns=2, **reads),
        StageSettings(name="settle", steps=budget.settle_steps, lr=budget.settle_lr, warmup=20, trains={"llm": 1.0},
                      mix=LessonMix(alone=0.3, grounding=budget.settle_grounding), turns=budget.settle_turns,
                      **pointer, **reads),
        *([ground] if budget.ground_steps else []),
        *([recount,
           # recount's questions alone leave no description or box (from slots after it: 0.07 of pairs named,
           # grounding 0.000): ground's conversations again, without the count word, recount's among them
           replace(ground, name="reground", slot_counts=False, steps=budget.reground_steps or ground.steps,
                   interleave=_with_recount((ground.mix, ground.turns), recount, budget.reground_recount_every,
                                            "reground_recount_every"))]
          if budget.recount_steps else []),
        # align trains no LLM: the head (read on the LLM's hidden states) has nothing to teach it there
        StageSettings(kind="align", steps=budget.align_steps, lr=budget.align_lr, trains={"vision": 1.0},
                      answer_weight=0.0, slot_weight=1.0, readout_weight=1.0,
                      box_readout_weight=budget.box_readout_weight, census_weight=budget.census_weight, warmup=50,
                      beta2=0.98, slot_counts=not budget.recount_steps, slot_tolerance=budget.slot_tolerance,
                      **common | {"match_weight": 0.0, "eval_every": 2 * budget.base_eval_every}),
        StageSettings(kind="tune", steps=budget.tune_steps, lr=budget.tune_lr,
                      trains={"vision": 1.0, "llm": budget.tune_llm_lr_scale}, lm_weight=0.5, slot_weight=1.0,
                      readout_weight=1.0, box_readout_weight=budget.box_readout_weight,
                      census_weight=budget.census_weight, warmup=50, beta2=0.98,
                      slot_counts=not budget.recount_steps, slot_tolerance=budget.slot_tolerance, **pointer,
                      mix=LessonMix(caption_noise=budget.caption_noise, alone=0.3), **common),
    ]
    if budget.tune_recount_every:
        if not budget.recount_steps:
            raise ValueError("Budget.tune_recount_every asks tune for recount's questions: it needs recount_steps > 0")
        tune = stages[-1]
        stages[-1] = replace(tune, interleave=_with_recount((tune.mix, tune.turns), recount, budget.tune_recount_every,
                                                            "tune_recount_every"))
    return stages


def _with_recount(lesson: tuple, recount: StageSettings, recount_every: int, field: str) -> tuple:
    """A stage's steps in turn: k - 1 of its own lesson (mix, turns), then one batch of recount's (k = recount_every;
    0: its own alone), so that the count learnt in recount is asked on while the rest is learnt (reground) or read
    from pixels (tune)."""
    if not recount_every:
        return ()
    if recount_every < 2:
        raise ValueError(f"Budget.{field} must be 0 (none) or 2 or more (every k-th step one of recount's), got "
                         f"{recount_every}: at 1 the stage would be recount again")
    return (lesson,) * (recount_every - 1) + ((recount.mix, recount.turns),)


NUMBER_PERIODS = (1000, 500, 250, 100, 50, 25, 10)  # the phases whole-number tokens start from


# The LM head's number rows start as this times `number_code` (box_code="number"): a trained row's norm, not a fresh
# one's (0.32). Started at 0.32 (course11), read left the code at 0.27 under an offset of 2.04 that every number row
# shares (their logits pushed down together), and settle's box read stayed at 5.7-6.2 for 350 steps, where nc1's
# rows at 1.84 took it to 4.4 in 200 (docs/probes/README.md, stop 41).
NUMBER_CODE_ROW_NORM = 2.0


def number_rows(count: int, dim: int, norm: float, seed: int) -> torch.Tensor:
    """[count, dim] starting rows for the tokens of 0 .. count-1: a fixed random projection of (cos, sin) of
    2 pi n / P for each period P, each row of norm `norm`. Near numbers start near each other (cosine 0.97 for
    neighbours, 0.6 five apart, 0.3 250 apart), so what the LLM learns to write for one number carries to its
    neighbours, where random rows leave each of the 1000 to its own few examples (as the stop-39 probes started;
    not measured against random rows)."""
    angles = 2 * math.pi * torch.arange(count, dtype=torch.float64)[:, None] / torch.tensor(NUMBER_PERIODS)
    phases = torch.cat((angles.cos(), angles.sin()), -1).float()  # (count, 2P)
    projection = torch.randn(phases.shape[1], dim, generator=torch.Generator().manual_seed(seed))
    rows = phases @ projection  # (count, dim)
    return rows * (norm / rows.norm(dim=1, keepdim=True))


def _fresh_model(world: Path, init: Path, seed: int, whole_numbers: bool = False, box_code: str = "bins"):
    """Tokenizer (the world's texts and the lessons'; with `whole_numbers`, 0-999 one token each) and a random model
    of `base_config`, saved to `init`; reused when `init` already holds them (with the same kind of tokenizer).
    With box_code="number" the LM head's number rows start as `number_code` (the slots' box code, same seed)."""
    if box_code == "number" and not whole_numbers:
        raise ValueError("Budget.box_code='number' writes each coordinate as one token: it needs whole_numbers=True")
    if (init / "config.json").is_file():
        tokenizer = load_tokenizer(init)
        has_them = not split_numbers(tokenizer)
        if has_them != whole_numbers:
            raise ValueError(f"{init}: this run's tokenizer has {'' if has_them else 'no '}"
                             f"whole-number tokens, but the budget asks for {'them' if whole_numbers else 'digits'}; "
                             f"train into another --out")
        model = MLLMModel.from_pretrained(init)
        if whole_numbers:
            rows = model.llm.lm_head.weight[whole_number_ids(tokenizer)].detach()
            coded = torch.allclose(rows, NUMBER_CODE_ROW_NORM * number_code(rows.shape[1], seed), atol=1e-4)
            if coded != (box_code == "number"):
                raise ValueError(f"{init}: this run's LM head starts its number rows "
                                 f"{'on' if coded else 'off'} the number code, but the budget asks for box_code="
                                 f"{box_code!r}; train into another --out")
        return model, tokenizer
    tokenizer = build_tokenizer(tokenizer_corpus(world) + tokenizer_texts(seed=seed), vocab_size=1024,
                                whole_numbers=whole_numbers)
    torch.manual_seed(seed)
    model = MLLMModel(base_config(tokenizer))
    if whole_numbers:
        ids = whole_number_ids(tokenizer)
        with torch.no_grad():
            for k, weight in enumerate((model.llm.get_input_embeddings().weight, model.llm.lm_head.weight)):
                if k == 1 and box_code == "number":
                    weight[ids] = (NUMBER_CODE_ROW_NORM * number_code(weight.shape[1], seed)).to(weight.dtype)
                else:
                    norm = float(weight.norm(dim=1).mean())
                    weight[ids] = (norm * number_rows(1000, weight.shape[1], 1.0, seed + k)).to(weight.dtype)
    model.save_pretrained(init, tokenizer=tokenizer)
    return model, tokenizer


def _slots(tokenizer, model, seed: int, box_code: str = "bins") -> SceneSlots:
    torch.manual_seed(seed)  # the same starting tables whether read runs beside phase 0 or after it
    return SceneSlots(tokenizer, model.config.llm.hidden_size, SLOT_GRID, box_code=box_code, code_seed=seed)


def _fresh_resampler(model, seed: int) -> None:
    """Alignment starts from a fresh resampler: phase 0's fed only its throwaway heads, and from it the slot
    regression and the read-back barely move in 1,000 steps (measured: normalised MSE 1.03 -> 1.05 and read-back
    loss 1.93 -> 1.66, existence from pixels 0.50), where a fresh one reaches 1.04 and 0.89 by step 600
    (existence 0.60 at 500). A finished or resumed align stage loads its own resampler over this one."""
    torch.manual_seed(seed)
    model.resampler.load_state_dict(MLLMModel(model.config).resampler.state_dict())


def _read_beside(out: Path, budget: Budget, seed: int, handoff=None) -> None:
    """The read-kind stages (read, settle, ...) in their own process on one core while phase 0 has the other; a
    finished stage hands on only the LLM and the slots (`BaseStage.load_finished`). Once `handoff` (an Event) is
    set, phase 0 is done: the stage under way saves at its next step and this process ends, so that the main
    process resumes it there on every core instead of one core idling for the rest of the read-kind stages."""
    torch.set_num_threads(1)
    model, tokenizer = _fresh_model(out / "world", out / "base" / "init", seed, budget.whole_numbers, budget.box_code)
    slots = _slots(tokenizer, model, seed, budget.box_code)
    stages = base_stages(budget)
    for k, settings in enumerate(stages):
        if settings.kind != "read" or (handoff is not None and handoff.is_set()):
            break
        summary = BaseStage(model, tokenizer, slots, settings, out / "base" / settings.label, seed=seed,
                            after=stages[:k]).run(progress=lambda line: print(line, flush=True),
                                                  stop=None if handoff is None else handoff.is_set)
        if summary is None:
            break


@contextlib.contextmanager
def _stopping_together(reader: multiprocessing.Process):
    """While phase 0 runs here and `reader` beside it: a stop of this process (an error, Ctrl-C, a SIGTERM) stops the
    reader too, so that no stage goes on training unseen and a rerun never finds two processes writing one stage
    (each resumes from its last saved state). SIGTERM is turned into SystemExit meanwhile (main thread only)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if reader.is_alive():
            reader.terminate()
            reader.join()


def vision_phase(stage: Path, world: Path, budget: Budget, seed: int):
    """Phase 0 under `stage/phase0`: the fresh model's vision side pretrained on the world's labels; a finished
    one is reused (the phase is deterministic for a seed and its log is written last). Returns (model, tokenizer,
    log). It touches neither the LLM nor the slots, so the read-kind stages may run beside it."""
    log_path = stage / "phase0" / "vision_pretrain_log.json"
    wanted = {"steps": budget.vision_pretrain_steps, "batch": budget.vision_pretrain_batch,
              "lr": budget.vision_pretrain_lr, "centre": budget.vision_pretrain_centre, "seed": seed}
    if log_path.is_file() and (stage / "phase0" / "model.safetensors").is_file():
        _check_phase0(stage / "phase0", wanted)
        print(f"reusing the finished vision pretraining in {stage / 'phase0'}", flush=True)
        return (MLLMModel.from_pretrained(stage / "phase0"), load_tokenizer(stage / "phase0"),
                json.loads(log_path.read_text()))
    model, tokenizer = _fresh_model(world, stage / "init", seed, budget.whole_numbers, budget.box_code)
    log = pretrain(model, world, steps=budget.vision_pretrain_steps, batch_size=budget.vision_pretrain_batch,
                   lr=budget.vision_pretrain_lr, seed=seed, centre_weight=budget.vision_pretrain_centre)
    model.save_pretrained(stage / "phase0", tokenizer=tokenizer)
    plot_log(log, stage / "phase0" / "vision_pretrain.png")
    write_json_atomic(stage / "phase0" / "settings.json", wanted)
    write_json_atomic(log_path, log)
    return model, tokenizer, log


def _check_phase0(folder: Path, wanted: dict) -> None:
    """A finished phase 0 is reused only for the settings it was trained with. One finished before its settings
    were recorded counts as trained without the centre head (the others unknown, so not checked)."""
    path = folder / "settings.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {"centre": 0.0}
    differ = sorted(k for k in recorded if recorded[k] != wanted.get(k))
    if differ:
        detail = "; ".join(f"{k}: finished with {recorded[k]!r}, asked {wanted.get(k)!r}" for k in differ)
        raise ValueError(f"{path}: this finished vision pretraining was trained with other settings ({detail}); run "
                         f"into another --out, or move {folder} away to train it again (nothing is deleted)")


def stage_base(out: Path, budget: Budget, seed: int) -> dict:
    """Phase 0 (vision pretraining, `pretrain` above), then read, settle, ground, align and tune (`base_stages`),
    then the polish rounds (`mllm.course.polish`); the last round's model is the base. With two cores or more,
    phase 0 and the read-kind stages (which share no parameters) run side by side, one core each, and when phase 0
    ends the read-kind stage under way goes on here on every core (`_read_beside`'s handoff). Every phase
    resumes: a finished one is reused, a stopped one goes on from its last saved state, so a stopped run goes on
    where it was."""
    world = world_dir(out, budget, seed)
    stage = out / "base"
    reader = None
    stages = base_stages(budget)
    last_read = [s.label for s in stages if s.kind == "read"][-1]
    if len(os.sched_getaffinity(0)) >= 2 and not (stage / last_read / "done.json").is_file() \
            and not (stage / "phase0" / "vision_pretrain_log.json").is_file():
        # phase 0 trains only the vision side and the read-kind stages only the LLM and slots: one core each
        # written before either process reads it
        _fresh_model(world, stage / "init", seed, budget.whole_numbers, budget.box_code)
        spawn = multiprocessing.get_context("spawn")
        handoff = spawn.Event()
        reader = spawn.Process(target=_read_beside, args=(out, budget, seed, handoff))
        reader.start()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with _stopping_together(reader):
            model, tokenizer, log = vision_phase(stage, world, budget, seed)
            handoff.set()  # the read-kind stage under way goes on here, on every core (below)
            torch.set_num_threads(threads)
            reader.join()
    else:
        model, tokenizer, log = vision_phase(stage, world, budget, seed)
    if reader is not None:
        if reader.exitcode != 0:
            raise RuntimeError(f"the read-kind stages beside the vision pretraining failed (exit "
                               f"{reader.exitcode}); rerun to resume them where they stopped, under {stage}")
    slots = _slots(tokenizer, model, seed, budget.box_code)
    summaries, curves = [], []
    for k, settings in enumerate(stages):
        if settings.kind == "align":
            _fresh_resampler(model, seed)
        runner = BaseStage(model, tokenizer, slots, settings, stage / settings.label, seed=seed, after=stages[:k])
        summaries.append(runner.run(progress=lambda line: print(line, flush=True)))
        curves.append((settings.label, runner.curve()))
    polished, polish_curve = polish(stage / "tune" / "model", world, stage / "polish", budget, seed)
    if polish_curve:
        curves.append(("polish", polish_curve))
    polish_minutes = polish_curve[-1]["cpu_minutes"] if polish_curve else 0.0
    model_dir = stage / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(polished, model_dir)
    pretrain_cpu_minutes = log[-1].get("cpu_minutes", log[-1]["minutes"])  # logs before CPU time was kept
    plot_base_curves(curves, pretrain_cpu_minutes, stage / "base_curves.png")
    scored = _answered_by_the_last_round(polished, stage) if polish_curve else model_dir
    chair_metrics = describe_and_score(scored, world, stage, limit=budget.eval_limit)
    yesno_metrics = answer_yesno(scored, world, stage, limit=budget.eval_limit)
    grounding_metrics = ground_and_score(scored, world, stage, limit=budget.eval_limit)
    kinds = json.loads((stage / "yesno.json").read_text()).get("categories", {})
    cpu_minutes = pretrain_cpu_minutes + sum(s["cpu_minutes"] for s in summaries) + polish_minutes
    return {"stage": "base", "model_dir": str(model_dir), "train_cpu_minutes": round(cpu_minutes, 1),
            "vision_pretrain": log[-1], "stages": summaries, "curves": str(stage / "base_curves.png"),
            "polish": {"rounds": len(polish_curve), "cpu_minutes": round(polish_minutes, 2), "curve": polish_curve},
            "chair": chair_metrics, "yesno": yesno_metrics,
            "yesno_kinds": {k: round(v["acc"], 3) for k, v in kinds.items()}, "grounding": grounding_metrics}


def _answered_by_the_last_round(polished: Path, stage: Path) -> Path:
    """The last polish round evaluated these very weights on the same benches: its answers are copied beside the
    base's (where the base has none yet) and the base is scored from them, instead of answering everything again
    (minutes). Returns the model folder the answers are fingerprinted with, the round's."""
    for name in ("bench_answers_greedy.jsonl", "yesno_answers.jsonl", "rec_answers.jsonl"):
        answered = polished.parent / "eval" / name
        if answered.is_file() and not (stage / name).exists():
            shutil.copyfile(answered, stage / name)
    return polished


def plot_base_curves(curves: list[tuple[str, list[dict]]], start_minutes: float, path: Path) -> None:
    """Held-out yes/no accuracy per kind (top), the share of colour-category pairs greedy descriptions name,
    greedy grounding's Acc@0.5 and, for polish rounds, the bench's CHAIR Recall (bottom) against cumulative
    training CPU-minutes, stage by stage (read-kind stages: the scene as slot vectors; align, tune and polish:
    from pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, below) = plt.subplots(2, 1, figsize=(7, 5.6), sharex=True, height_ratios=(2, 1))
    offset, colours = start_minutes, {}
    for index, (kind, curve) in enumerate(curves):
        points = [entry for entry in curve if "yesno" in entry]
        for name in sorted({k for entry in points for k in entry["yesno"]}):
            line = ax.plot([offset + e["cpu_minutes"] for e in points], [e["yesno"].get(name) for e in points],
                           marker=".", color=colours.get(name), label=name if name not in colours else None)
            colours.setdefault(name, line[0].get_color())
        described = [entry for entry in points if "describe" in entry]
        below.plot([offset + e["cpu_minutes"] for e in described], [e["describe"] for e in described], marker=".",
                   color="black", label="pairs named (greedy descriptions)" if index == 0 else None)
        recalled = [entry for entry in points if "recall" in entry]
        below.plot([offset + e["cpu_minutes"] for e in recalled], [e["recall"] for e in recalled], marker="o",
                   color="tab:purple", label="bench Recall (greedy; polish rounds)" if recalled else None)
        grounded = [entry for entry in points if "ground" in entry]
        below.plot([offset + e["cpu_minutes"] for e in grounded], [e["ground"]["acc"] for e in grounded], marker=".",
                   color="tab:brown", label="grounding Acc@0.5 (greedy)" if index == 0 else None)
        offset += curve[-1]["cpu_minutes"] if curve else 0.0
        for axes in (ax, below):
            axes.axvline(offset, color="grey", lw=0.5)
        ax.text(offset, 0.985, f"{kind} ", ha="right", va="top", rotation=90, fontsize=8, color="grey")  # close stages
    ax.set_ylabel("held-out yes/no accuracy")
    ax.set_ylim(0.4, 1.0)
    ax.legend(fontsize=8, ncol=5, loc="lower left")
    below.set_ylabel("held-out share")
    below.set_ylim(0.0, 1.0)
    below.legend(fontsize=8, loc="upper left")
    below.set_xlabel("training CPU-minutes (vision pretraining first)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
