"""What every course stage shares: the run's budget, the world it trains on, and the evaluations a stage runs
before and after training (CHAIR on the description bench, yes/no accuracy, grounding Acc@0.5, test loss)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mllm.data.grounding_prepare import GROUNDING_PROMPT  # the grounding prompt's one home
from mllm.jsonio import write_json_atomic


STAGES = ["base", "sft", "grounding", "preference"]  # in the order `mllm course` runs them


@dataclass
class Budget:
    """Sizes of one course run; `quick()` for smoke runs."""

    n_train: int = 4000
    n_test: int = 300
    caption_noise: float = 0.25
    vision_pretrain_steps: int = 3000  # phase 0: the vision side on the scenes' labels
    vision_pretrain_batch: int = 64
    vision_pretrain_lr: float = 3e-3
    vision_pretrain_centre: float = 0.0  # phase 0: weight of each object patch naming its slot cell (0: no such head)
    read_steps: int = 1000  # the LLM from random init: yes/no questions + the statements turn, from slot vectors
    read_lr: float = 1e-3
    settle_steps: int = 400  # then the full mix (descriptions, lookups, grounding) on a fresh schedule
    settle_lr: float = 5e-4
    settle_grounding: float = 1.0  # settle's grounding turns' weight in its mix (the others' sum is ~1)
    settle_turns: int = 8  # turns a conversation in settle (a grounding-heavy mix asks for more boxes a scene)
    # then a grounding phase of its own (0: none): grounding-heavy conversations with yes/no questions kept among
    # them, boxes read from the image positions by the box heads (stop 42; nc4: teacher-forced 0.79 in 150 steps)
    ground_steps: int = 200
    ground_lr: float = 5e-4
    ground_turns: int = 8
    # ground's description turns' weight (grounding's is 1.0), lone turns included: 0.4 kept settle's descriptions
    # (course13: 0.394 of pairs named after ground, as after settle), 0.1 too (course12; Recall 47.2 at the end)
    ground_describe: float = 0.4
    # then the LLM alone, the count word taken out of the slots (`recount`), so that a count question is answered by
    # counting the cells of that category, which the image tokens can give (a category's count in every cell of it
    # they cannot: read back at its prior after align and tune); align and tune then regress slots without it.
    # 0: no such stage, the count word in the slots throughout (stop 48: count from slots .73 / .85 / .94 after
    # 250 / 500 / 750 steps at 5e-4 from course18's ground stage; from a random LLM, read without it: .69 at 1,000)
    recount_steps: int = 0
    recount_lr: float = 5e-4
    # then ground's conversations again without it (`reground`), for this many steps (0: ground_steps), every k-th of
    # them one of recount's instead (0: none; stop 48: after 200 of ground's alone count from slots fell .94 -> .67)
    reground_steps: int = 0
    reground_recount_every: int = 0
    tune_recount_every: int = 0  # tune too: every k-th step one of recount's batches, from pixels (0: none)
    match_weight: float = 1.0  # each image position says whether it answers the first question (all but align)
    # settle, tune: each description token pointed at its object's cell; off: measured no better (docs/probes, stop 36)
    pointer_weight: float = 0.0
    pointer_boxes: bool = False  # ... and each grounding answer's tokens at the referred object's cell
    # ... the pointer as head 0 of the LLM's layer 2 itself, and the next object word read from that head alone
    # (off: measured better teacher-forced after 700 steps, not yet through a whole course; docs/probes, stop 37)
    pointer_attention: bool = False
    read_weight: float = 0.0
    # settle, tune: box coordinates as whole-number tokens, each looked up and written by a head of its own (stop 39)
    whole_numbers: bool = True
    box_role_weight: float = 1.0
    # the slots' box as "bins" (learnt), or "number": the number tokens' own code, which the LM head's number rows
    # start from (`scene_slots.number_code`; needs whole_numbers; stop 41)
    box_code: str = "number"
    box_readout_weight: float = 0.25  # align, tune: the box code read back from the image tokens (box_code="number")
    census_weight: float = 0.0  # align, tune: every cell read back as empty or its object's category (0: off)
    slot_tolerance: float = 0.0  # align, tune: an object near a border may be held across it (cells; 0: off)
    align_steps: int = 3000  # vision + resampler regress the slots and read back words (no LLM in the step)
    align_lr: float = 1e-3
    tune_steps: int = 300  # everything; the LLM at tune_llm_lr_scale x tune_lr
    tune_lr: float = 3e-4
    tune_llm_lr_scale: float = 0.5
    # then rounds of DPO on the base's own greedy descriptions corrected from their first error (`course.polish`)
    polish_rounds: int = 3
    polish_images: int = 1500  # fresh scenes a round describes
    polish_steps: int = 800  # of 8 pairs (two rounds, cut pairs: Recall 75.8; 400 steps of whole-text ones: 65.6)
    polish_anchors: float = 0.34  # grounding pairs per description pair
    # yes/no pairs per description pair, round by round (the last value for any further round): a third round at
    # 0.5 took course16's base from yes/no 0.916 / acc+ 0.865 to 0.928 / 0.889 on 3,000 fresh questions (stop 47)
    polish_yesno_anchors: tuple[float, ...] = (0.34, 0.34, 0.5)
    # count questions per description pair, about the round's scenes, mostly about a category they hold more than once
    # (`self_pairs.count_anchor_pairs`; 0: none). One round on 792 fresh count questions: without them 0.880 -> 0.819
    # (course26; twice-held 98 -> 51 of 138), with 0.34 of them 0.811 -> 0.852 (course27; 28 -> 91 of 138, stop 53)
    polish_count_anchors: float = 0.0
    base_batch: int = 32  # scenes per step (a conversation each) in every base stage
    base_eval_scenes: int = 100  # held-out scenes (a yes/no pair each) for the stages' curves
    base_eval_every: int = 250  # align: twice this (its steps are short and many)
    base_ground_scenes: int = 30  # held-out scenes each stage grounds one object of, greedily, at each evaluation
    base_save_every: int = 50
    sft_steps: int = 150
    # the stage's schedule runs to this or its 17 minutes of training, whichever comes first (1,100 steps: 0.643,
    # 1,700: 0.725 from course14's base; docs/probes/README.md, stop 45)
    grounding_steps: int = 1700
    grounding_minutes: float = 17.0
    sft_batch: int = 16
    sft_lr: float = 1e-4
    eval_limit: int | None = None  # questions per evaluation (None: all)
    preference_pairs: str = "self"  # "self": pairs from the base's own descriptions; "world": preference_train.json
    smoke_test: bool = False  # set by quick(): the course table says its numbers are a smoke run's

    @classmethod
    def quick(cls) -> "Budget":
        return cls(n_train=200, n_test=40, vision_pretrain_steps=20, vision_pretrain_batch=16, read_steps=30,
                   settle_steps=5, ground_steps=5, align_steps=10, tune_steps=10,
                   polish_rounds=1, polish_images=4, polish_steps=4, base_batch=8, base_eval_scenes=20,
                   base_eval_every=10, base_ground_scenes=4, base_save_every=10, sft_steps=10, grounding_steps=20,
                   sft_batch=8, eval_limit=40, smoke_test=True)


def world_dir(out: Path, budget: Budget, seed: int) -> Path:
    from mllm.world.synth import generate

    world = out / "world"
    if not (world / "meta.json").is_file():
        generate(world, n_train=budget.n_train, n_test=budget.n_test, seed=seed, caption_noise=budget.caption_noise)
    return world


def fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


# ---- shared evaluations ----------------------------------------------------------------------------------------
def describe_and_score(model_dir: Path, world: Path, out_dir: Path, decoding: str = "greedy",
                       limit: int | None = None, max_new_tokens: int = 160, runtime: dict | None = None) -> dict:
    """Answer the world's description bench with the model, then CHAIR against the world's ground truth."""
    from mllm.eval import chair
    from mllm.eval.answer import run

    answers = out_dir / f"bench_answers_{decoding}.jsonl"
    run(str(model_dir), world / "bench.jsonl", answers, decoding=decoding, batch_size=16,
        max_new_tokens=max_new_tokens, limit=limit, quiet=True, on_other_run="recompute", **(runtime or {}))
    vocab, gt = chair.load_chair_gt(world / "chair_gt.json")
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    if not any(r["answer"].strip() for r in records):
        # A model that has not learnt to write yet (a few smoke-test steps) names nothing: nothing hallucinated,
        # nothing recalled. CHAIR itself refuses to score no caption at all.
        print(f"{model_dir}: every description is empty; CHAIR scores them as naming nothing")
        result = {"overall_metrics": {"CHAIRs": 0.0, "CHAIRi": 0.0, "Recall": 0.0, "Len": 0.0},
                  "counts": {"captions": 0, "skipped": len(records)}, "sentences": []}
    else:
        result = chair.score([{"image_id": r["image_id"], "caption": r["answer"]} for r in records], gt, vocab)
    result["echo"] = echo_share([r["answer"] for r in records])
    write_json_atomic(out_dir / f"chair_{decoding}.json", result)
    return result["overall_metrics"] | {"Echo": result["echo"]}


def echo_share(descriptions: list[str]) -> float:
    """Share of descriptions holding a question mark: the world's descriptions never ask anything, so a "?" is a
    prompt's text written into the description ("A small red moon is in the image? answer in the image?"), which
    a DPO round can teach by pushing place words down (stop 45: 128 of course14's 300 bench descriptions)."""
    return sum("?" in text for text in descriptions) / len(descriptions) if descriptions else 0.0


def yesno_questions(test_json: Path, out: Path) -> Path:
    """The exercise's yes/no test file -> an `mllm answer` question file (target and category kept), read the way
    `mllm answer` reads such a file itself (`conversation_questions`); `image_path` repeats the image so that it
    survives into the answers' metainfos."""
    from mllm.eval.answer import conversation_questions

    with open(out, "w") as f:
        for _, record, problem in conversation_questions(test_json):
            if problem is not None:
                raise ValueError(problem)
            f.write(json.dumps({**record, "image_path": record["image"]}) + "\n")
    return out


def answer_yesno(model_dir: Path, world: Path, out_dir: Path, limit: int | None = None,
                 runtime: dict | None = None) -> dict:
    from mllm.eval import yesno
    from mllm.eval.answer import run

    questions = yesno_questions(world / "yesno_test.json", out_dir / "yesno_questions.jsonl")
    answers = out_dir / "yesno_answers.jsonl"
    run(str(model_dir), questions, answers, batch_size=32, max_new_tokens=4, limit=limit, quiet=True,
        image_root=world, on_other_run="recompute", **(runtime or {}))
    records = []
    for line in answers.read_text().splitlines():
        row = json.loads(line)
        meta = row["metainfos"]
        records.append({"answer": row["answer"], "target": meta["target"], "image": meta["image_path"],
                        "category": meta.get("category")})
    result = yesno.score(records)
    write_json_atomic(out_dir / "yesno.json", result)
    return result["overall"]


def ground_and_score(model_dir: Path, world: Path, out_dir: Path, limit: int | None = None,
                     runtime: dict | None = None) -> dict:
    """Acc@IoU>=0.5 of the model on the world's held-out referring expressions (unpadded 0-1000 grid)."""
    from mllm.eval import grounding
    from mllm.eval.answer import run

    questions = out_dir / "rec_questions.jsonl"
    with open(questions, "w") as f:
        for line in (world / "rec_test.jsonl").read_text().splitlines():
            rec = json.loads(line)
            question = GROUNDING_PROMPT.format(expression=rec["expression"])
            f.write(json.dumps({"image": rec["img_path"], "question": question,
                                "bbox": rec["bbox"], "width": rec["width"], "height": rec["height"],
                                "split": "synthetic", "image_id": rec["image_id"]}) + "\n")
    answers = out_dir / "rec_answers.jsonl"
    run(str(model_dir), questions, answers, batch_size=32, max_new_tokens=24, limit=limit, quiet=True,
        image_root=world, on_other_run="recompute", **(runtime or {}))
    result = grounding.score_files(answers, square_pad=False)
    write_json_atomic(out_dir / "grounding.json", result)
    return result["overall"]


def test_loss(model_dir: Path, data_json: Path, image_folder: Path, batch_size: int = 32) -> float:
    """Token-mean cross-entropy of a model over an SFT-format file (the exercise's test loss)."""
    import torch

    from mllm.data.collate import SupervisedCollator
    from mllm.data.sft_dataset import SupervisedDataset
    from mllm.model.loading import load_pretrained
    from mllm.train.losses import token_nll_sum

    model, tokenizer, _ = load_pretrained(model_dir)
    dataset = SupervisedDataset.from_config(data_json, tokenizer, model.config, str(image_folder))
    collate = SupervisedCollator(pad_id=tokenizer.pad_token_id or 0)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            labels = batch.pop("labels")
            logits = model(**batch).logits
            nll, n = token_nll_sum(logits, labels)
            total, count = total + float(nll), count + int(n)
    return total / max(count, 1)
