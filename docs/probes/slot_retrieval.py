"""Does the LLM of a finished read-kind stage pick one slot out, or read the slots as a bag? Measurements on fresh
scenes given as slot vectors (no pixels), one thread:

    .venv/bin/python docs/probes/slot_retrieval.py where|colour|attention|describe RUN/base STAGE_FOLDER...

    where      "Where is the red moon?": the true place phrase among the nine, by teacher-forced log-prob
    colour     "What colour is the moon?" (a category held once): the true colour among the six
    attention  per layer, mean over heads, attention from the answer position and from the asked category word
               onto the asked object's slot, against an occupied slot's average
    describe   "Describe the image in detail." asked first, greedy: share of the scene's colour-category pairs named
    describe_p as describe with the world's own detailed prompts (`DETAILED_PROMPTS`, drawn per scene, as the
               product's description bench asks), not the fixed one none of them is
    describe_after  the same asked after the scene's statements turn (true answers), as read-kind stages train it
    next       teacher-forced: the true detailed description after the statements turn; for the k-th object
               sentence, is the argmax at its colour word the true colour, and at its category word the true
               category (given every earlier sentence right)? By k: finding the next object, without greedy's cascade
    next1      the same with the place-first sentences ("In the top left there is a small red ring."): the colour
               given the object's place
    next0      as next with the description asked first (no statements turn before it); next10: next1 so
    pointed:L  next0's teacher-forced descriptions: the weight query head 0 of decoder layer L gives the k-th
               object's cell from the positions that predict its colour word and its category word (the attention
               pointer of `StageSettings.pointer_attention` is trained on that head), and how often it is the
               head's largest weight among the 36 cells
    PROBE@band, PROBE@compact, PROBE@rank, PROBE@triple: stages trained with the slots band-major, occupied first
               (in description order) or with one more slot table; PROBE@qfirst: the image after the first question

The tokenizer and config come from RUN/base/phase0; each STAGE_FOLDER's finished LLM and slots are loaded in order
(e.g. RUN/base/read RUN/base/bind RUN/base/settle; "grow:4" among them deepens the LLM there, `common.read_chain`).
docs/probes/README.md has the numbers.
"""
import random
import sys
from collections import Counter
from pathlib import Path

import torch

from common import band_major_slots, compact_slots, extra_slot_table, read_chain
from mllm.data.lessons import fresh_scene, statements
from mllm.train.base_recipe import BaseStage, StageSettings, collate, encode, with_image_tokens
from mllm.train.scene_slots import slot_features
from mllm.world import scenes as S

torch.set_num_threads(1)
probe = sys.argv[1]
probe, _, variant = probe.partition("@")  # e.g. describe_after@band, describe_after@rank
probe, _, POINTED_LAYER = probe.partition(":")  # pointed:2
QFIRST = variant == "qfirst"  # stages trained with the image after the first question (the course's base, stop 35)
if QFIRST:
    pass
elif variant in ("band", "compact"):  # the slots reordered (`common.band_major_slots`, `common.compact_slots`)
    if probe not in ("describe", "describe_after", "next", "next1", "next0"):
        raise SystemExit(f"@{variant} is for the describe probes (the others index slots row-major)")
    band_major_slots() if variant == "band" else compact_slots()
elif variant:  # stages trained with one more slot table (`common.extra_slot_table`, docs/probes/read_continue.py)
    extra_slot_table(variant)
model, tokenizer, slots = read_chain(sys.argv[2], sys.argv[3:], attn_implementation="eager")
read = StageSettings(kind="read", steps=1, lr=1e-3, trains={"llm": 1.0, "slots": 1.0}, eval_scenes=1)
stage = BaseStage(model, tokenizer, slots, read, Path("unused"))  # its batch and logit helpers
model.eval()


def prompt(question: str, before: list | None = None) -> tuple[torch.Tensor, int]:
    """Ids up to the position that predicts the last answer's first word [1, T] (after the turns `before`), and
    where the image span starts. Labels are pre-shifted (labels[t] is the token after t) and each answer's begin
    with the newline after the assistant tag."""
    x = encode((before or []) + [(question, "X")], tokenizer, stage.token_ids, stage.query_num, QFIRST)
    at = (x["labels"] != -100).nonzero().flatten()
    first = int(at[[0] + [i for i in range(1, len(at)) if at[i] - at[i - 1] > 1]][-1])  # the last answer's start
    return x["input_ids"][:first + 2][None], int(x["image_bound"][0][0])


def best_answer(scene, question: str, answers: list[str]) -> int:
    """Index of the answer with the highest summed log-prob of its tokens."""
    batch = collate([encode([(question, a)], tokenizer, stage.token_ids, stage.query_num, QFIRST) for a in answers],
                    stage.pad_id)
    tokens, _ = stage._image_tokens([scene] * len(answers), [])
    logprobs = stage._forward(batch, tokens).logits.float().log_softmax(-1)
    scores = []
    for i, labels in enumerate(batch["labels"]):
        at = (labels != -100).nonzero().flatten()
        scores.append(float(logprobs[i, at, labels[at]].sum()))  # pre-shifted: position t scores labels[t]
    return max(range(len(answers)), key=scores.__getitem__)


def unique_objects(scene, by_category: bool) -> list:
    counts = S._counts(scene)
    return [o for o in scene.objects if counts[o.category] == 1] if by_category else S._unique_colour_category(scene)


rng = random.Random({"where": 123, "colour": 123, "attention": 5, "describe": 7, "describe_p": 7, "describe_after": 7, "next": 7,
                     "next1": 7, "next0": 7, "next10": 7, "pointed": 7}[probe])
with torch.no_grad():
    if probe in ("where", "colour"):
        hits, n, chosen = 0, 0, Counter()
        for _ in range(120):
            scene = fresh_scene(rng)
            candidates = unique_objects(scene, by_category=probe == "colour")
            if not candidates:
                continue
            obj = rng.choice(candidates)
            if probe == "where":
                cells = list(S.CELL_PHRASES)
                answers = [f"{S.CELL_PHRASES[c][0].upper()}{S.CELL_PHRASES[c][1:]}." for c in cells]
                truth = cells.index(S.grid_cell(obj, scene.width, scene.height))
                question = f"Where is the {obj.colour} {obj.category}?"
            else:
                answers, truth = list(S.COLOURS), list(S.COLOURS).index(obj.colour)
                question = f"What colour is the {obj.category}?"
            best = best_answer(scene, question, answers)
            hits, n = hits + (best == truth), n + 1
            chosen[answers[best]] += 1
        print(f"{probe}: {hits / n:.3f} right (chance {1 / len(answers):.3f}), n={n}; answers given: {dict(chosen)}")
    elif probe == "attention":
        totals, n = 0, 0
        for _ in range(60):
            scene = fresh_scene(rng)
            candidates = unique_objects(scene, by_category=True)
            if not candidates or len(scene.objects) < 2:
                continue
            k = scene.objects.index(rng.choice(candidates))
            cells = [f[0] for f in slot_features(scene, slots.grid)]
            ids, start = prompt(f"What colour is the {scene.objects[k].category}?")
            category_id = tokenizer.encode(" " + scene.objects[k].category, add_special_tokens=False)[-1]
            tokens, _ = stage._image_tokens([scene], [])
            embeds = with_image_tokens(model, {"input_ids": ids, "image_starts": torch.tensor([start])}, tokens)
            attentions = model.llm(inputs_embeds=embeds, output_attentions=True).attentions  # L x (1, H, T, T)
            row = []
            for at in (-1, int((ids[0] == category_id).nonzero()[-1])):  # the answer position, the category word
                image = torch.stack([a[0, :, at].mean(0) for a in attentions])[:, start:start + stage.query_num]
                occupied = sorted(set(cells))
                row.append(torch.stack([image[:, cells[k]], image[:, occupied].sum(1) / len(occupied)], 1))
            totals, n = totals + torch.stack(row), n + 1  # (2 places, L, 2)
        for name, per_layer in zip(("answer position", "category word"), (totals / n).tolist()):
            for layer, (target, average) in enumerate(per_layer):
                print(f"from the {name}, layer {layer}: asked object's slot {target:.3f}, an occupied slot {average:.3f}")
    elif probe in ("next", "next1", "next0", "next10", "pointed"):
        form = int(probe in ("next1", "next10"))  # `detailed_description`'s variant: 1 writes the place first
        right = {}  # k -> [colour right, category right, n]
        for _ in range(100):
            scene = fresh_scene(rng)
            mentions = S.scene_mentions(scene, rng)
            text = S.detailed_description(mentions, form)
            # qfirst: one of the world's prompts (the course's base never saw the probe's fixed one)
            asked = rng.choice(S.DETAILED_PROMPTS) if QFIRST else "Describe the image in detail."
            turns = ([] if probe in ("next0", "next10", "pointed") else [statements(scene, rng)]) + [(asked, text)]
            batch = collate([encode(turns, tokenizer, stage.token_ids, stage.query_num, QFIRST)], stage.pad_id)
            tokens, _ = stage._image_tokens([scene], [])
            predicted = stage._forward(batch, tokens).logits[0].argmax(-1)  # predicted[t]: the token after t
            if probe == "pointed":
                embeds = with_image_tokens(model, batch, tokens)
                weights = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                    output_attentions=True).attentions[int(POINTED_LAYER)][0, 0]  # (T, T)
                start = int(batch["image_starts"][0])
                cells = weights[:, start:start + stage.query_num]  # (T, Q)
                cell_of = [f[0] for f in slot_features(scene, slots.grid)]
            ids = batch["input_ids"][0].tolist()
            pieces = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            answer = pieces["input_ids"]
            span = next(i for i in range(len(ids)) if ids[i:i + len(answer) - 1] == answer[1:]) - 1  # answer[0] at
            searched = 0  # no colour word before an object's own (the count sentence and places hold none)
            for k, m in enumerate(mentions):
                hits = []
                colour_at = text.index(f" {m.colour} ", searched) + 1
                searched = text.index(f" {m.name}", colour_at) + 1
                for word_at in (colour_at, searched):
                    token = next(j for j, (a, b) in enumerate(pieces["offset_mapping"]) if a <= word_at < b)
                    if probe == "pointed":
                        cell = cell_of[k]  # mentions follow scene.objects
                        at = cells[span + token - 1]
                        hits += [float(at[cell]), float(at.argmax() == cell)]
                    else:
                        hits.append(int(predicted[span + token - 1]) == answer[token])
                row = right.setdefault(k + 1, [0.0] * len(hits) + [0])
                right[k + 1] = [a + b for a, b in zip(row, hits + [1])]
        for k, (*sums, n) in sorted(right.items()):
            if probe == "pointed":
                print(f"object {k}: weight on its cell / argmax there, from the position predicting the colour "
                      f"{sums[0] / n:.2f} / {sums[1] / n:.2f}, the category {sums[2] / n:.2f} / {sums[3] / n:.2f} "
                      f"(n={n})")
            else:
                print(f"object {k}: colour {sums[0] / n:.2f}, category {sums[1] / n:.2f} (n={n})")
    else:
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        named = total = 0
        for i in range(30):
            scene = fresh_scene(rng)
            asked = rng.choice(S.DETAILED_PROMPTS) if probe == "describe_p" else "Describe the image in detail."
            ids, start = prompt(asked,
                                [statements(scene, rng)] if probe == "describe_after" else None)
            tokens, _ = stage._image_tokens([scene], [])
            written = []
            for _ in range(120):  # greedy, no cache: a short text
                embeds = with_image_tokens(model, {"input_ids": ids, "image_starts": torch.tensor([start])}, tokens)
                token = int(model.llm(inputs_embeds=embeds).logits[0, -1].argmax())
                if token == end:
                    break
                written.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
            text = tokenizer.decode(written)
            pairs = {(o.colour, o.category) for o in scene.objects}
            named += sum(f"{c} {k}" in text for c, k in pairs)
            total += len(pairs)
            if i < 3:
                print(sorted(pairs), "->", text.strip())
        print(f"describe: {named / total:.3f} of {total} colour-category pairs named")
