"""The tiny base's training, the way real MLLMs are built: the LLM learns to read scenes first, vision second.

    read    the LLM (and the slot tables of `scene_slots`) on lessons about fresh scenes, each scene handed
            over as slot vectors in the image-token positions; answer loss + next-token loss on every text
            token (the questions too: it is what teaches a fresh LLM to attend to the context)
    align   the vision tower and resampler, LLM frozen: their Q tokens regress the slot vectors of the rendered
            scene (normalised MSE). The frozen LLM's answer loss can be added (answer_weight), but measured it
            costs 12x per step and fits worse: normalised MSE 1.07 after 500 steps (24 CPU-minutes) with it,
            0.56 after 1,000 steps (4 CPU-minutes) without. The regression alone fits the cells' own vectors
            and leaves out the words the questions read (category read back from the tokens at 0.10); a
            cross-entropy of reading them back (`readout_weight`, `SceneSlots.readout_loss`) gives 0.89, and the
            frozen LLM then answers existence from pixels at 0.76 (0.49 without), after 1,000 steps
    tune    everything: vision at `lr`, the LLM at `llm_lr_scale` x `lr`, slot regression kept as an anchor

Every batch is fresh scenes (rendering costs a few ms a scene); held-out yes/no accuracy per kind is read from
the Yes-vs-No logit of single-question conversations about scenes of a held-out stream. A stage saves its full
state (weights, optimiser, schedule, random streams, CPU time, curve) every `save_every` steps and resumes from
it; a finished stage writes `model/` (an ordinary checkpoint folder) and `slots.safetensors`, then `done.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mllm.data.conversation import conversation_to_ids, place_images
from mllm.data.boxes import iou, parse_box
from mllm.data.lessons import LessonMix, fresh_scene, grounding_turn
from mllm.jsonio import write_json_atomic
from mllm.model.checkpoint import load_state_dict
from mllm.model.decode import decode
from mllm.model.image_processing import ImageProcessor
from mllm.model.loading import bf16_autocast_pays
from mllm.model.tokenization import special_token_ids
from mllm.train.scene_slots import SceneSlots, assign_cells
from mllm.train.stage_heads import (BOX_ROLES, attention_pointer_losses, box_role_losses, check_box_heads,
                                   image_positions, match_loss, new_match_head, new_pointer_head, pointer_loss,
                                   whole_number_ids)
from mllm.world import scenes as S

PARTS = ("llm", "slots", "vision")  # what a stage may train; vision = vision tower + resampler
MODEL_PARTS = {"llm": ("llm",), "vision": ("vpm", "resampler")}  # the model's submodules (state-dict prefixes)


@dataclass
class StageSettings:
    kind: str  # "read" (slots in the image positions) | "align" / "tune" (rendered images through the vision side)
    steps: int
    lr: float
    trains: dict = field(default_factory=dict)  # part -> learning-rate multiple (absent: frozen)
    batch: int = 32
    turns: int = 4
    answer_weight: float = 1.0  # cross-entropy on the assistants' tokens
    lm_weight: float = 0.0  # next-token cross-entropy on every text token (answers included)
    slot_weight: float = 0.0  # normalised MSE between the image tokens and the scene's slot vectors
    readout_weight: float = 0.0  # cross-entropy of the object words read back from the image tokens
    box_readout_weight: float = 0.0  # ... and of the box coordinates (slots of box_code="number" only)
    census_weight: float = 0.0  # cross-entropy of every cell read as empty or its object's category (no ghosts)
    # (align, tune) an object within this many cells of its cell's border may be held in the neighbour across it,
    # where the image tokens already hold it (`scene_slots.assign_cells`): one cell an object, whichever (0: off)
    slot_tolerance: float = 0.0
    question_first: bool = False  # the image after the conversation's first question, not before it
    match_weight: float = 0.0  # binary cross-entropy of each image position saying whether it answers that question
    match_layer: int = 2  # ... read from the hidden states after this many decoder layers
    # cross-entropy of a pointer from each description token to the image cell of the object its sentence is about
    pointer_weight: float = 0.0
    pointer_layer: int = 2  # ... from the hidden states after this many decoder layers
    pointer_boxes: bool = False  # ... and from each grounding answer's tokens to the referred object's cell
    pointer_attention: bool = False  # ... taught to head 0 of decoder layer pointer_layer, not to a throwaway head
    read_weight: float = 0.0  # with pointer_attention: cross-entropy of the next object word from that head alone
    box_read_weight: float = 0.0  # with pointer_attention and pointer_boxes: ... of each box digit, through the layer
    # each coordinate of a grounding box (whole-number tokens) looked up and written by a head of its own
    box_role_weight: float = 0.0  # (`stage_heads.box_role_losses`)
    box_heads: tuple = ((2, 2), (2, 3), (3, 2), (3, 3))  # ... (decoder layer, query head) for x0, y0, x1, y1
    warmup: int = 100
    beta2: float = 0.95
    bf16: bool | None = None  # bf16 autocast; None: where it pays on this machine (`bf16_autocast_pays`)
    log_every: int = 25
    save_every: int = 50
    eval_every: int = 250
    eval_scenes: int = 300  # held-out scenes; one yes/no pair each
    describe_scenes: int = 30  # held-out scenes described greedily at each evaluation (0: none)
    ground_scenes: int = 30  # held-out scenes with one object to ground greedily at each evaluation (0: none)
    mix: LessonMix = field(default_factory=LessonMix)
    curriculum: tuple[tuple[LessonMix, int], ...] = ()  # (mix, steps) in order before `mix`: the first steps
    # (mix, turns) pairs the steps after the curriculum take in turn, one a step, in place of `mix` and `turns`: two
    # kinds of conversation in separate batches (`reground`: recount's questions kept beside ground's writing)
    interleave: tuple[tuple[LessonMix, int], ...] = ()
    name: str = ""  # the stage's folder and label when one kind runs more than once (default: kind)
    slot_counts: bool = True  # the slots hold each object's category count word (`SceneSlots.count_words`)

    def __post_init__(self):
        if self.kind not in ("read", "align", "tune"):
            raise ValueError(f"StageSettings.kind must be read, align or tune, got {self.kind!r}")
        if len(self.box_heads) != len(BOX_ROLES) or len(set(map(tuple, self.box_heads))) != len(BOX_ROLES):
            raise ValueError(f"StageSettings.box_heads must name {len(BOX_ROLES)} different (layer, head) pairs, one "
                             f"for each of {BOX_ROLES}, got {self.box_heads}")
        if self.slot_tolerance and (self.kind == "read" or self.pointer_weight):
            raise ValueError(f"StageSettings.slot_tolerance applies to image tokens from pixels (align, tune) without "
                             f"the pointer head; got kind={self.kind!r}, pointer_weight={self.pointer_weight}")
        unknown = set(self.trains) - set(PARTS)
        if unknown or not self.trains:
            raise ValueError(f"StageSettings.trains must map some of {PARTS} to learning-rate multiples, "
                             f"got {self.trains}")

    @property
    def label(self) -> str:
        return self.name or self.kind


# ---- batches ---------------------------------------------------------------------------------------------------
def encode(turns: list[tuple[str, str]], tokenizer, token_ids: dict, query_num: int,
           question_first: bool = False) -> dict:
    """A conversation about one image -> ids, labels, image_bound. The image goes before the first question, or
    after it with `question_first` (MiniCPM-V's chat takes either order): then every image position can look at the
    question, so that whether a cell answers it is computed where the cell is (see `match_weight`)."""
    conversation = []
    for question, answer in turns:  # place_images puts the image into the first question, before or after its text
        conversation += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    conversation, _ = place_images(conversation, {"<image>": None}, query_num, question_first)
    return conversation_to_ids(conversation, tokenizer, query_num=query_num, token_ids=token_ids)


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-padded to a multiple of 32 (few distinct shapes: oneDNN caches its kernels per shape).
    lm_labels: the next token at every real position, except into and inside the image span."""
    length = -(-max(len(x["input_ids"]) for x in items) // 32) * 32
    batch = len(items)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    lm_labels = torch.full((batch, length), -100, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    starts = []
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = x["input_ids"], x["labels"], 1
        start, end = (int(v) for v in x["image_bound"][0])
        lm_labels[i, :n - 1] = x["input_ids"][1:]
        lm_labels[i, start - 1:end] = -100  # image positions are inputs, never targets
        starts.append(start)
    return {"input_ids": ids, "labels": labels, "lm_labels": lm_labels, "attention_mask": mask,
            "image_starts": torch.tensor(starts)}


def with_image_tokens(model, batch: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Text embeddings [B, T, D] with tokens [B, Q, D] in each sample's image span."""
    embeds = model.llm.get_input_embeddings()(batch["input_ids"])
    return embeds.index_put(image_positions(batch["image_starts"], tokens.shape[1]), tokens.to(embeds.dtype))


def vision_tokens(model, processor: ImageProcessor, images: list) -> torch.Tensor:
    """One view per image (the base does not slice) -> [B, Q, D]."""
    strips, sizes = [], []
    for image in images:
        views = processor(image)
        if len(views["pixel_values"]) != 1:
            raise ValueError("the base recipe expects one view per image (slice.max_slice_nums = 1)")
        strips.append(views["pixel_values"][0])
        sizes.append([int(v) for v in views["tgt_sizes"][0]])
    return model.get_vision_embedding(strips, torch.tensor(sizes, dtype=torch.int32))


# ---- the stage ------------------------------------------------------------------------------------------------
class BaseStage:
    """One stage of the recipe over a model, its tokenizer and the slot tables; `run` trains, resumes, saves."""

    def __init__(self, model, tokenizer, slots: SceneSlots, settings: StageSettings, folder: Path, seed: int = 0,
                 after: list[StageSettings] | tuple = ()):
        """`after`: the stages this one goes on from, in order; their training settings are fingerprinted into its
        state and done.json, so that a stage is never resumed or reused on top of another chain."""
        self.model, self.tokenizer, self.slots, self.settings = model, tokenizer, slots, settings
        self.folder, self.seed = Path(folder), seed
        self.after = chain_fingerprint(after)
        self.after_before_stop38 = chain_fingerprint(after, as_before_stop38=True)  # accepted in records too
        self.token_ids = special_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id or 0
        self.query_num = model.config.query_num
        if slots.grid ** 2 != self.query_num:
            raise ValueError(f"{slots.grid}x{slots.grid} slots for {self.query_num} image tokens")
        self.processor = ImageProcessor.from_config(model.config.slice)
        self.yes_no = [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No")]
        self.heldout = self._heldout()
        self.describe_heldout = self._describe_heldout()
        self.ground_heldout = self._ground_heldout()
        self.device = model.device  # the model and the slots on one device; batches follow them
        self.bf16 = bf16_autocast_pays(self.device.type) if settings.bf16 is None else settings.bf16
        self.match_head = None  # a throwaway head of the stage (in its state.pt, never in the model)
        if settings.match_weight:
            if not settings.question_first:
                raise ValueError("StageSettings.match_weight needs question_first: an image position before the "
                                 "question cannot look at it")
            self.match_head = new_match_head(model.config.llm.hidden_size, seed).to(self.device)
        self.pointer_head = None  # throwaway as well (`stage_heads.pointer_loss`)
        if settings.pointer_weight and not settings.pointer_attention:
            self.pointer_head = new_pointer_head(model.config.llm.hidden_size, seed + 1).to(self.device)
        if settings.read_weight and not (settings.pointer_weight and settings.pointer_attention):
            raise ValueError("StageSettings.read_weight reads through the attention pointer: it needs pointer_weight "
                             "and pointer_attention")
        if settings.box_read_weight and not (settings.pointer_weight and settings.pointer_attention
                                             and settings.pointer_boxes):
            raise ValueError("StageSettings.box_read_weight reads through the attention pointer on boxes: it needs "
                             "pointer_weight, pointer_attention and pointer_boxes")
        self.object_words = slots.word_ids().to(self.device) if settings.read_weight else None  # what it reads
        self.box_digits = None  # ... and the digits of its boxes
        if settings.box_read_weight:
            self.box_digits = torch.tensor([tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)],
                                           device=self.device)
        self.whole_numbers = None  # the box roles' number tokens
        if settings.box_role_weight:
            check_box_heads(settings.box_heads, model.config.llm)
            self.whole_numbers = whole_number_ids(tokenizer).to(self.device)

    # the parts and what they compute
    def _modules(self, part: str) -> list[torch.nn.Module]:
        if part == "slots":
            return [self.slots]
        return [getattr(self.model, name) for name in MODEL_PARTS[part]]

    def _set_trainable(self) -> list[dict]:
        groups = []
        for head in (self.match_head, self.pointer_head):
            if head is None:
                continue
            groups.append({"params": list(head.parameters()), "lr": self.settings.lr,
                           "initial_lr": self.settings.lr})
        for part in PARTS:
            trains = part in self.settings.trains
            params = [p for m in self._modules(part) for p in m.parameters()]
            for p in params:
                p.requires_grad_(trains)
            for m in self._modules(part):
                m.train(trains)
            if trains:
                lr = self.settings.lr * self.settings.trains[part]
                groups.append({"params": params, "lr": lr, "initial_lr": lr})
        return groups

    def _scenes(self, rng: random.Random, n: int) -> tuple[list[S.Scene], list]:
        if self.settings.kind == "read":
            return [fresh_scene(rng) for _ in range(n)], []
        pairs = [S.render_scene(S.sample_scene(rng, "lesson")) for _ in range(n)]
        return [scene for _, scene in pairs], [image for image, _ in pairs]

    def _image_tokens(self, scenes, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens the LLM reads [B, Q, D], slot vectors [B, Q, D])."""
        slot_vectors = self.slots(scenes, self.model.llm.get_input_embeddings().weight)
        if self.settings.kind == "read":
            return slot_vectors, slot_vectors
        return vision_tokens(self.model, self.processor, images), slot_vectors

    def _encode(self, turns: list[tuple[str, str]]) -> dict:
        return encode(turns, self.tokenizer, self.token_ids, self.query_num, self.settings.question_first)

    def _on_device(self, batch: dict) -> dict:
        return {name: value.to(self.device) for name, value in batch.items()}

    def _forward(self, batch: dict, tokens: torch.Tensor, hidden_states: bool = False):
        """The LLM's output on the batch with `tokens` [B, Q, D] in the image spans (its hidden states if asked)."""
        embeds = with_image_tokens(self.model, batch, tokens)
        return self.model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                              output_hidden_states=hidden_states)

    def lesson_at(self, step: int) -> tuple[LessonMix, int]:
        """The lesson mix of training step `step` (1-based) and the turns of each of its conversations."""
        s = self.settings
        end = 0
        for mix, steps in s.curriculum:
            end += steps
            if step <= end:
                return mix, s.turns
        if s.interleave:
            return s.interleave[(step - end - 1) % len(s.interleave)]
        return s.mix, s.turns

    def loss(self, scenes, images, rng: random.Random, mix: LessonMix | None = None, turns: int | None = None) -> dict:
        """The stage's weighted losses; the LLM runs only when a text loss has weight (slot regression alone
        needs just the vision side: 12x cheaper steps, measured)."""
        s = self.settings
        parts = {}
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            tokens, slot_vectors = self._image_tokens(scenes, images)
            cells = None
            if s.slot_tolerance:
                embedding = self.model.llm.get_input_embeddings().weight
                cells = assign_cells(self.slots, scenes, tokens, slot_vectors, s.slot_tolerance)
                slot_vectors = self.slots(scenes, embedding, cells)
            if s.answer_weight or s.lm_weight:
                mix, turns = mix or s.mix, turns or s.turns
                conversations = [mix.turns(scene, rng, turns) for scene in scenes]
                if not all(conversations):  # a mix that only grounds finds no turn in a scene of look-alikes
                    kept = [b for b, conversation in enumerate(conversations) if conversation]
                    scenes, conversations = [scenes[b] for b in kept], [conversations[b] for b in kept]
                    tokens, slot_vectors = tokens[kept], slot_vectors[kept]
                    cells = None if cells is None else [cells[b] for b in kept]
                batch = self._on_device(collate([self._encode(c) for c in conversations], self.pad_id))
                out = self._forward(batch, tokens,
                                    hidden_states=bool(s.match_weight or s.pointer_weight or s.box_role_weight))
                logits = out.logits.flatten(0, 1)  # (B*T, V), in float only where a loss reads it (below)
                if s.match_weight:
                    match = self._match_loss(scenes, conversations, batch, out.hidden_states[s.match_layer], cells)
                    if match is not None:
                        parts["match"] = match
                if s.pointer_weight:
                    parts |= self._pointer_loss(scenes, conversations, batch, out.hidden_states[s.pointer_layer])
                if s.box_role_weight:
                    parts |= box_role_losses(self.model.llm, out.hidden_states, scenes, conversations, batch,
                                             self.tokenizer, self.slots.grid, s.box_heads, self.whole_numbers, cells)
        if s.answer_weight or s.lm_weight:
            # one log-softmax for both losses, over the positions either scores (not the image span, not padding):
            # two cross-entropies over every position were a fifth of a tune step, measured
            answers, lm_labels = batch["labels"].flatten(), batch["lm_labels"].flatten()
            scored = ((answers != -100) & bool(s.answer_weight)) | ((lm_labels != -100) & bool(s.lm_weight))
            log_probs = logits[scored].float().log_softmax(-1)  # (scored positions, V)
            if s.answer_weight:
                parts["answer"] = F.nll_loss(log_probs, answers[scored], ignore_index=-100)
            if s.lm_weight:
                parts["lm"] = F.nll_loss(log_probs, lm_labels[scored], ignore_index=-100)
        if s.slot_weight:
            tokens, slot_vectors = tokens.float(), slot_vectors.float()
            parts["slots"] = ((tokens - slot_vectors) ** 2).mean() / slot_vectors.var()
        if s.readout_weight:
            parts["readout"] = self.slots.readout_loss(scenes, tokens.float(),
                                                       self.model.llm.get_input_embeddings().weight, cells)
        if s.box_readout_weight:
            parts["box_readout"] = self.slots.box_readout_loss(scenes, tokens.float(), cells)
        if s.census_weight:
            parts["census"] = self.slots.census_loss(scenes, tokens.float(),
                                                     self.model.llm.get_input_embeddings().weight, cells)
        weights = {"answer": s.answer_weight, "lm": s.lm_weight, "slots": s.slot_weight, "readout": s.readout_weight,
                   "box_readout": s.box_readout_weight, "census": s.census_weight,
                   "match": s.match_weight, "pointer": s.pointer_weight, "read": s.read_weight,
                   "read_box": s.box_read_weight, "box_attend": s.box_role_weight, "box_read": s.box_role_weight}
        parts["total"] = sum(weights[name] * value for name, value in parts.items())
        return parts

    def _match_loss(self, scenes, conversations, batch: dict, hidden: torch.Tensor,
                    cells: list | None = None) -> torch.Tensor | None:
        return match_loss(self.match_head, scenes, conversations, batch, hidden, self.slots.grid, cells)

    def _pointer_loss(self, scenes, conversations, batch: dict, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.settings
        if s.pointer_attention:
            return attention_pointer_losses(self.model.llm, s.pointer_layer, scenes, conversations, batch, hidden,
                                            self.tokenizer, self.slots.grid, s.pointer_boxes,
                                            self.object_words, self.box_digits)
        pointer = pointer_loss(self.pointer_head, scenes, conversations, batch, hidden, self.tokenizer,
                               self.slots.grid, s.pointer_boxes)
        return {} if pointer is None else {"pointer": pointer}

    @contextlib.contextmanager
    def _eval_mode(self):
        """Every part in eval mode meanwhile, each back to its own mode after."""
        was_training = {m: m.training for part in PARTS for m in self._modules(part)}
        for m in was_training:
            m.eval()
        try:
            yield
        finally:
            for m, training in was_training.items():
                m.train(training)

    # held-out yes/no
    def _heldout_scene(self, rng: random.Random) -> tuple:
        """(scene, image): the image only where the stage reads pixels."""
        if self.settings.kind == "read":
            return fresh_scene(rng), None
        image, scene = S.render_scene(S.sample_scene(rng, "heldout"))
        return scene, image

    def _heldout(self) -> list[tuple]:
        rng = random.Random(f"base/heldout/{self.seed}")
        out = []
        for _ in range(self.settings.eval_scenes):
            scene, image = self._heldout_scene(rng)
            kind, pair = S.yesno_pair(scene, rng)
            out += [(kind, scene, image, question, answer) for question, answer in pair]
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Accuracy per yes/no kind and overall, from the Yes-vs-No logit at the answer position."""
        with self._eval_mode():
            hits = defaultdict(list)
            for k in range(0, len(self.heldout), 100):
                chunk = self.heldout[k:k + 100]
                items = [self._encode([(q, a)]) for _, _, _, q, a in chunk]
                labels = collate(items, self.pad_id)
                answer_at = torch.isin(labels["labels"], torch.tensor(self.yes_no)).int().argmax(1)  # first Yes/No
                batch = self._on_device(labels)
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                    tokens, _ = self._image_tokens([c[1] for c in chunk], [c[2] for c in chunk])
                    logits = self._forward(batch, tokens).logits.float()
                for i, (kind, _, _, _, answer) in enumerate(chunk):
                    yes, no = logits[i, int(answer_at[i]), self.yes_no]
                    hits[kind].append(("Yes" if yes > no else "No") == answer)
        result = {kind: round(sum(v) / len(v), 4) for kind, v in sorted(hits.items())}
        result["all"] = round(sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values()), 4)
        return result

    # held-out descriptions
    def _describe_heldout(self) -> list[tuple]:
        """(scene, image, prompt) per held-out scene to describe: one of the world's detailed prompts each, the
        ones its description bench asks."""
        rng = random.Random(f"base/describe/{self.seed}")
        out = []
        for _ in range(self.settings.describe_scenes):
            scene, image = self._heldout_scene(rng)
            out.append((scene, image, rng.choice(S.DETAILED_PROMPTS)))
        return out

    @torch.no_grad()
    def describe(self, max_new_tokens: int = 120) -> float:
        """Share of the held-out scenes' (colour, category) pairs that greedy descriptions name: whether the LLM
        walks the objects one by one, which the yes/no curve does not show (an LLM that answers yes/no well may
        name the first object only, then repeat it)."""
        by_prompt = defaultdict(list)
        for scene, image, prompt in self.describe_heldout:
            by_prompt[prompt].append((scene, image))
        named = total = 0
        with self._eval_mode():
            for prompt, group in by_prompt.items():  # one prompt, one length: a batch without padding
                texts = self._greedy(prompt, [g[0] for g in group], [g[1] for g in group], max_new_tokens)
                for (scene, _), text in zip(group, texts):
                    pairs = {(o.colour, o.category) for o in scene.objects}
                    named += sum(f"{colour} {category}" in text for colour, category in pairs)
                    total += len(pairs)
        return round(named / max(1, total), 4)

    # held-out grounding
    def _ground_heldout(self) -> list[tuple]:
        """(scene, image, prompt, true box on the unpadded 0-1000 grid) per held-out scene: the grounding prompt
        about one object its expression picks out alone, as the course's grounding bench asks."""
        rng = random.Random(f"base/ground/{self.seed}")
        out = []
        while len(out) < self.settings.ground_scenes:
            scene, image = self._heldout_scene(rng)
            turn = grounding_turn(scene, rng)
            if turn is not None:
                out.append((scene, image, turn[0], parse_box(turn[1])[0]))
        return out

    @torch.no_grad()
    def ground(self, max_new_tokens: int = 24) -> dict:
        """Greedy boxes for the held-out grounding prompts: Acc@0.5 (IoU of the first parsed box with the truth at
        least 0.5; an unparsable answer counts as a miss), mean IoU and the share parsed. The stage's own view of
        what the course's grounding bench measures on the finished model."""
        hits, ious, parsed = 0, [], 0
        with self._eval_mode():
            for scene, image, prompt, truth in self.ground_heldout:  # prompts differ in length: one at a time
                text = self._greedy(prompt, [scene], [image], max_new_tokens)[0]
                found = parse_box(text)
                overlap = iou(found[0], truth) if found is not None else 0.0
                parsed, hits = parsed + (found is not None), hits + (overlap >= 0.5)
                ious.append(overlap)
        n = max(1, len(ious))
        return {"acc": round(hits / n, 4), "iou": round(sum(ious) / n, 4), "parsed": round(parsed / n, 4)}

    def _greedy(self, prompt: str, scenes: list, images: list, max_new_tokens: int) -> list[str]:
        """Greedy answers to `prompt` asked first about each scene, up to <|im_end|> (the project's decode loop)."""
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        x = self._encode([(prompt, "X")])
        first = int((x["labels"] != -100).nonzero()[0])  # labels are pre-shifted: the answer's first token
        ids = x["input_ids"][:first + 2][None].expand(len(scenes), -1).to(self.device)  # (G, T): up to "\n"
        starts = torch.full((len(scenes),), int(x["image_bound"][0][0]), device=self.device)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            tokens, _ = self._image_tokens(scenes, images)
            embeds = with_image_tokens(self.model, {"input_ids": ids, "image_starts": starts}, tokens)
            rows = decode(self.model.llm, embeds, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=end,
                          pad_token_id=end).tolist()  # (G, N): rows that stopped are filled with <|im_end|>
        return [self.tokenizer.decode(row[:row.index(end)] if end in row else row) for row in rows]

    # training
    def _schedule(self, optimizer):
        s = self.settings
        def factor(step: int) -> float:  # linear warm-up, cosine decay to zero at `steps`
            return min(1.0, (step + 1) / s.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / s.steps)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _save(self, state: dict) -> None:
        temporary = self.folder / "state.pt.tmp"
        torch.save(state, temporary)
        os.replace(temporary, self.folder / "state.pt")
        write_json_atomic(self.folder / "log.json", state["log"])

    def run(self, progress=print, stop=None) -> dict | None:
        """Train to `steps` (resuming from `state.pt`), write the model and `done.json`; return the summary.
        A finished stage (done.json present) only loads its weights. `stop`: asked after every step; when it says
        so, the state is saved at that step and None returned (a later run resumes there)."""
        s, folder = self.settings, self.folder
        folder.mkdir(parents=True, exist_ok=True)
        self.slots.count_words = s.slot_counts  # what this stage's slots hold, for its training and evaluations
        if (folder / "done.json").is_file():
            done = json.loads((folder / "done.json").read_text())
            _check_same_training(folder / "done.json", done.get("settings", {}), _jsonable(s))
            self._check_same_chain(folder / "done.json", done.get("after"))
            self.load_finished()
            return done | {"stage": s.label}  # the name is this run's (a stage may have been copied in)
        optimizer = torch.optim.AdamW(self._set_trainable(), betas=(0.9, s.beta2), weight_decay=0.01)
        schedule = self._schedule(optimizer)
        rng = random.Random(f"base/{s.kind}/{self.seed}")  # by kind: every read-kind stage draws the same stream
        torch.manual_seed(self.seed)
        step, cpu_seconds, log = 0, 0.0, []
        if (folder / "state.pt").is_file():  # our own file, read with the restricted unpickler all the same
            state = torch.load(folder / "state.pt", weights_only=True)
            self._check_same_chain(folder / "state.pt", state.get("after"))
            # the parts this stage trains: the others are this run's earlier stages' (a read-kind stage begun
            # beside phase 0 saved the init's vision, which must not come back over phase 0's)
            self.model.load_state_dict(self._trained_part(state["model"]), strict=False)
            self.slots.load_state_dict(state["slots"])
            if self.match_head is not None:
                self.match_head.load_state_dict(state["match_head"])
            if self.pointer_head is not None:
                self.pointer_head.load_state_dict(state["pointer_head"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            rng.setstate(_as_rng_state(state["rng"]))
            torch.set_rng_state(state["torch_rng"])
            step, cpu_seconds, log = state["step"], state["cpu_seconds"], state["log"]
            progress(f"{s.label}: resuming at step {step} of {s.steps}")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        started = time.process_time() - cpu_seconds
        while step < s.steps:
            scenes, images = self._scenes(rng, s.batch)
            parts = self.loss(scenes, images, rng, *self.lesson_at(step + 1))
            optimizer.zero_grad(set_to_none=True)
            parts["total"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            cpu_minutes = round((time.process_time() - started) / 60, 2)
            if step % s.log_every == 0 or step == s.steps:
                log.append({"step": step, "cpu_minutes": cpu_minutes,
                            **{f"loss_{k}": round(float(v.detach()), 4) for k, v in parts.items()}})
            if step % s.eval_every == 0 or step == s.steps:
                log.append({"step": step, "cpu_minutes": cpu_minutes, "yesno": self.evaluate()}
                           | ({"describe": self.describe()} if s.describe_scenes else {})
                           | ({"ground": self.ground()} if s.ground_scenes else {}))
                described = f", descriptions name {log[-1]['describe']:.3f} of pairs" if s.describe_scenes else ""
                grounded = f", grounding Acc@0.5 {log[-1]['ground']['acc']:.3f}" if s.ground_scenes else ""
                progress(f"{s.label} step {step}/{s.steps} ({cpu_minutes} CPU-min): {log[-1]['yesno']}{described}"
                         f"{grounded}")
            stopping = step < s.steps and stop is not None and stop()
            if step % s.save_every == 0 or step == s.steps or stopping:
                self._save({"model": self.model.state_dict(), "slots": self.slots.state_dict(),
                            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                            "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "step": step,
                            "cpu_seconds": time.process_time() - started, "log": log, "after": self.after}
                           | ({"match_head": self.match_head.state_dict()} if self.match_head is not None else {})
                           | ({"pointer_head": self.pointer_head.state_dict()}
                              if self.pointer_head is not None else {}))
            if stopping:
                progress(f"{s.label}: stopped at step {step} of {s.steps} (saved; a rerun resumes here)")
                return None
        self.model.config.question_first = s.question_first  # the order its prompts must keep (chat, benches)
        self.model.save_pretrained(folder / "model", tokenizer=self.tokenizer)
        save_file(self.slots.state_dict(), str(folder / "slots.safetensors"))
        evaluations = [entry for entry in log if "yesno" in entry]
        summary = {"stage": s.label, "steps": s.steps, "cpu_minutes": log[-1]["cpu_minutes"],
                   "yesno": evaluations[-1]["yesno"], "bf16": self.bf16, "settings": _jsonable(s), "after": self.after}
        for extra in ("describe", "ground"):
            if extra in evaluations[-1]:
                summary[extra] = evaluations[-1][extra]
        write_json_atomic(folder / "done.json", summary)
        (folder / "state.pt").unlink()  # the finished weights are in model/ and slots.safetensors
        return summary

    def _check_same_chain(self, path: Path, recorded: str | None) -> None:
        """Refuse a stage's saved state or finished weights trained after other stages than this run's (an earlier
        stage changed since): they would carry on the other chain's weights. Records from before the fingerprint
        (None) are taken as they are."""
        if recorded is not None and recorded not in (self.after, self.after_before_stop38):
            raise ValueError(f"{path}: this stage was trained on top of other earlier stages than this run's (their "
                             f"settings changed since: fingerprint {recorded}, now {self.after}); move "
                             f"{path.parent} away to train it again on this chain (nothing is deleted)")

    def load_finished(self) -> None:
        """Take over only the parts this stage trained: the others are the earlier stages' (so a stage that ran
        beside another, e.g. read beside the vision pretraining, does not bring back its starting vision)."""
        self.model.load_state_dict(self._trained_part(load_state_dict(self.folder / "model")), strict=False)
        if "slots" in self.settings.trains:
            self.slots.load_state_dict(load_file(str(self.folder / "slots.safetensors")))

    def _trained_part(self, state: dict) -> dict:
        """The entries of a model state dict that belong to the parts this stage trains."""
        prefixes = tuple(f"{name}." for part in self.settings.trains for name in MODEL_PARTS.get(part, ()))
        return {k: v for k, v in state.items() if k.startswith(prefixes)}

    def curve(self) -> list[dict]:
        return json.loads((self.folder / "log.json").read_text())


def _as_rng_state(state) -> tuple:
    """random.Random's state comes back from torch.save as nested lists or tuples; setstate wants tuples."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


# what changes only the curve, the saving or the arithmetic, not what a stage learns: bf16 autocast follows the
# machine (a stage finished where bf16 is fast is reused where it is not; done.json's own "bf16" says which ran)
_NOT_TRAINING = {"log_every", "save_every", "eval_every", "eval_scenes", "describe_scenes", "ground_scenes", "name",
                 "bf16"}


def chain_fingerprint(stages, as_before_stop38: bool = False) -> str:
    """A short hash of the training settings of `stages` in order (what changes only the curve, the saving or the
    arithmetic left out, as in `_check_same_training`). Fields at their defaults are left out too: a field added
    later defaults to the behaviour from before it, so finished stages keep their fingerprints.
    `as_before_stop38`: the hash as recorded until then (every field of the time, defaults included)."""
    defaults = _with_defaults({"curriculum": [], "mix": {}})
    settings = []
    for stage in stages:
        fields = {k: v for k, v in _jsonable(stage).items() if k not in _NOT_TRAINING}
        if as_before_stop38:
            fields = {k: v for k, v in fields.items() if k not in _ADDED_SINCE_STOP38}
        else:
            fields = {k: v for k, v in fields.items() if k not in defaults or v != defaults[k]}
        settings.append(fields)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# fields a stop-38-era record does not hash (it hashed every field of the time): each one added since
_ADDED_SINCE_STOP38 = {"box_read_weight", "box_role_weight", "box_heads", "box_readout_weight"}


def _check_same_training(path: Path, recorded: dict, wanted: dict) -> None:
    """A finished stage is reused only for the settings it was trained with: a budget changed since (more steps,
    another rate or mix) would otherwise be silently ignored. Fields added since it was recorded count as their
    defaults (the behaviour before they existed); a recorded field that is gone counts only when it was set."""
    recorded = _with_defaults(recorded)
    differ = sorted(k for k in (set(recorded) | set(wanted)) - _NOT_TRAINING if recorded.get(k) != wanted.get(k)
                    and not (k not in wanted and recorded[k] in (None, 0, False, [], {})))
    if differ:
        detail = "; ".join(f"{k}: finished with {recorded.get(k)!r}, asked {wanted.get(k)!r}" for k in differ)
        raise ValueError(f"{path}: this finished stage was trained with other settings ({detail}); run into "
                         f"another --out, or move {path.parent} away to train it again (nothing is deleted)")


def _with_defaults(recorded: dict) -> dict:
    """Recorded settings with every field (and every mix field) they lack at its default."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(StageSettings) if f.name not in ("kind", "steps", "lr")}
    full = json.loads(json.dumps(defaults, default=dataclasses.asdict)) | recorded
    mix_defaults = dataclasses.asdict(LessonMix())
    full["curriculum"] = [[mix_defaults | mix, steps] for mix, steps in full["curriculum"] or []]
    full["mix"] = mix_defaults | full["mix"]
    return full


def _jsonable(settings: StageSettings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(settings)))  # the mixes too; as done.json gives it back
