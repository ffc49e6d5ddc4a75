"""Preference pairs against the base's own greedy description (stop 44): its samples name far more of the scene
(course13's 6,000 samples of fresh scenes: Recall 72.8, CHAIRi 2.2) than its greedy description (Recall 47.2, one
object repeated), so the greedy one is the rejected answer.

    OMP_NUM_THREADS=2 nohup .venv/bin/python docs/probes/repeat_pairs.py from=runs/course13 out=runs/rp2 \
        pairs=continuation [anchors=450] [model=runs/rp1/preference/model] [steps=300] [lr=1e-4] > runs/rp2.log 2>&1 &

pairs: best_vs_greedy (chosen: the image's best sample, fewest absent objects then highest recall, when its recall is
min_gain above the greedy one's), plus_corrected (those and from's own balanced pairs), continuation (chosen: the
greedy description up to its first error, then the objects not yet named; objects matched on colour and shape
alone here, where `self_pairs.continue_correctly` matches size and place too), continuation_plus_corrected.
anchors: that many yes/no pairs of the pair scenes (chosen the true answer). model: start from another model (the
next round); the scenes stay from's 1,500.

Reads from's preference stage (fresh_scenes/, self_pairs/samples.jsonl, pairs.json); writes only under `out`:
greedy descriptions of the same scenes, the pairs, the trained model, CHAIR and yes/no on from's world after.
"""
import ast
import json
import random
import re
import sys
from pathlib import Path

from mllm.course.preference import FULL, align
from mllm.course.shared import answer_yesno, describe_and_score, fresh
from mllm.eval import chair
from mllm.eval.answer import run
from mllm.world import scenes as S


def greedy_answers(base: Path, scenes: Path, samples: list[dict], out: Path) -> list[dict]:
    seen, questions = set(), []
    for row in samples:  # one question per image: the one its samples answered
        if row["metainfos"]["image_id"] not in seen:
            seen.add(row["metainfos"]["image_id"])
            questions.append({"image": row["metainfos"]["image_path"], "question": row["question"],
                              "image_id": row["metainfos"]["image_id"], "image_path": row["metainfos"]["image_path"]})
    (out / "greedy_questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    run(str(base), out / "greedy_questions.jsonl", out / "greedy.jsonl", decoding="greedy", batch_size=32,
        max_new_tokens=160, image_root=scenes, quiet=True, on_other_run="recompute")
    return sorted((json.loads(line) for line in (out / "greedy.jsonl").read_text().splitlines()),
                  key=lambda r: r["idx"])


def scored(rows: list[dict], gt, vocab) -> list[tuple[int, float, dict]]:
    result = chair.score([{"image_id": r["metainfos"]["image_id"], "caption": r["answer"]} for r in rows], gt, vocab)
    assert not result["skipped"], result["skipped"][:3]
    return [(len(s["mscoco_hallucinated_words"]), s["metrics"]["Recall"], r) for s, r in zip(result["sentences"], rows)]


def best_vs_greedy(samples, greedy, min_gain: float) -> list[dict]:
    by_image: dict[str, list] = {}
    for item in samples:
        by_image.setdefault(item[2]["metainfos"]["image_id"], []).append(item)
    pairs = []
    for hallucinated, recall, row in greedy:
        image_id = row["metainfos"]["image_id"]
        best = min(by_image.get(image_id, []), key=lambda c: (c[0], -c[1]), default=None)
        if best is None or best[0] > hallucinated or (best[0] == hallucinated and best[1] < recall + min_gain):
            continue
        pairs.append({"question": row["question"], "chosen": best[2]["answer"], "rejected": row["answer"],
                      "image_path": row["metainfos"]["image_path"],
                      "metainfos": {"image_id": image_id, "source": "best_vs_greedy",
                                    "chosen_hallucinated": best[0], "rejected_hallucinated": hallucinated,
                                    "chosen_recall": round(best[1], 4), "rejected_recall": round(recall, 4)}})
    return pairs


_SENTENCE = re.compile(r"^(?:A (?P<size>[a-z-]+) (?P<colour>[a-z]+) (?P<name>[a-z]+) is (?P<place>[a-z ]+)\.|"
                       r"(?P<place1>[A-Z][a-z ]+?) there is an? (?P<size1>[a-z-]+) (?P<colour1>[a-z]+) (?P<name1>[a-z]+)\.)$")


def corrected_continuation(greedy, scenes: dict) -> list[dict]:
    """Per greedy description with an error (a sentence naming a (colour, shape) the scene has no more of, a wrong
    count sentence, objects left out): chosen = its sentences before the first error, then the scene's objects not
    yet named in raster order (the world's own wording, in the variant the model used); rejected = the greedy
    description. The two share every token up to the error, so DPO's gradient falls on the error alone."""
    pairs = []
    for _, _, row in greedy:
        image_id = row["metainfos"]["image_id"]
        scene = S.scene_from_dict(scenes[image_id])
        mentions = S.scene_mentions(scene, random.Random(0))
        sentences = re.split(r"(?<=\.)\s+", row["answer"].strip())
        variant = 1 if any(" there is " in x for x in sentences[1:]) else 0
        count_ok = sentences[0] == S.detailed_description(mentions, variant).split(". ")[0] + "."
        remaining, kept = list(mentions), []
        if count_ok:
            for sentence in sentences[1:]:
                m = _SENTENCE.match(sentence)
                if m is None:
                    break
                colour, name = m.group("colour") or m.group("colour1"), m.group("name") or m.group("name1")
                match = next((k for k in remaining if (k.colour, k.name) == (colour, name)), None)
                if match is None:
                    break
                remaining.remove(match)
                kept.append(sentence)
        if count_ok and not remaining and len(kept) == len(sentences) - 1:
            continue  # nothing wrong
        chosen_mentions = [m for m in mentions if m in remaining or True]
        # the sentences kept, then the unnamed objects in raster order (mentions is raster order)
        named = [m for m in mentions if m not in remaining]
        rest = [m for m in mentions if m in remaining]
        full = S.detailed_description(named + rest, variant) if not count_ok else None
        if count_ok:
            tail = S.detailed_description(rest, variant).split(". ", 1)[1] if rest else ""
            chosen = " ".join([sentences[0], *kept, tail]).strip()
        else:
            chosen = S.detailed_description(mentions, variant)
        del chosen_mentions, full
        if chosen == row["answer"].strip():
            continue
        pairs.append({"question": row["question"], "chosen": chosen, "rejected": row["answer"],
                      "image_path": row["metainfos"]["image_path"],
                      "metainfos": {"image_id": image_id, "source": "corrected_continuation",
                                    "kept_sentences": len(kept), "count_ok": count_ok}})
    return pairs


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    source, out = Path(args.pop("from")), Path(args.pop("out"))
    kind = args.pop("pairs", "best_vs_greedy")
    min_gain = float(args.pop("min_gain", "0.2"))
    anchors = int(args.pop("anchors", "0"))  # yes/no pairs of the pair scenes (chosen the truth), against forgetting
    policy = args.pop("model", None)  # another starting model (a second round); from's base by default
    settings = FULL | {"pairs": "world"} | {k: ast.literal_eval(v) for k, v in args.items()}
    out.mkdir(parents=True, exist_ok=True)
    base, world, scenes = source / "base" / "model", source / "world", source / "preference" / "fresh_scenes"
    base = Path(policy) if policy else base
    vocab, gt = chair.load_chair_gt(scenes / "chair_gt.json")
    sample_rows = sorted((json.loads(line) for line in
                          (source / "preference" / "self_pairs" / "samples.jsonl").read_text().splitlines()),
                         key=lambda r: r["idx"])
    sample_rows = [r for r in sample_rows if r["answer"].strip()]
    greedy = scored(greedy_answers(base, scenes, sample_rows, out), gt, vocab)
    if kind.startswith("continuation"):
        scene_list = [json.loads(line) for line in (scenes / "scenes.jsonl").read_text().splitlines() if line.strip()]
        pairs = corrected_continuation(greedy, {sc["image_id"]: sc for sc in scene_list})
        print("example:", json.dumps(pairs[:2], indent=1), flush=True)
    else:
        pairs = best_vs_greedy(scored(sample_rows, gt, vocab), greedy, min_gain)
    if kind in ("plus_corrected", "continuation_plus_corrected"):
        pairs += json.loads((source / "preference" / "self_pairs" / "pairs.json").read_text())
    if anchors:
        items = json.loads((scenes / "yesno_train.json").read_text())
        random.Random(1).shuffle(items)
        for item in items[:anchors]:
            question, answer = item["conversations"][0]["content"], item["conversations"][1]["content"]
            pairs.append({"question": question.replace("<image>\n", ""), "chosen": answer,
                          "rejected": "No" if answer == "Yes" else "Yes", "image_path": item["image"],
                          "metainfos": {"image_id": item["id"], "source": "yesno_anchor"}})
    random.Random(0).shuffle(pairs)
    for i, pair in enumerate(pairs):
        pair["idx"] = i
    pair_world = out / "pair_world"
    pair_world.mkdir(exist_ok=True)
    if not (pair_world / "images").exists():
        (pair_world / "images").symlink_to((scenes / "images").resolve(), target_is_directory=True)
    (pair_world / "preference_train.json").write_text(json.dumps(pairs))
    g_recall = sum(g[1] for g in greedy) / len(greedy)
    print(f"greedy on the pair scenes: Recall {g_recall:.3f}, hallucinating {sum(g[0] > 0 for g in greedy)}; "
          f"{len(pairs)} pairs ({kind}); settings {settings}", flush=True)
    stage = out / "preference"
    stage.mkdir(exist_ok=True)
    result = align(base, pair_world, stage, settings)
    model = Path(result["model_dir"])
    after = describe_and_score(model, world, fresh(stage / "after"), "greedy")
    yesno = answer_yesno(model, world, fresh(stage / "after_yesno"))
    print({"after": after, "yesno": yesno, "pairs": result["pairs"], "train_minutes": round(result["train_minutes"], 1),
           "final": result["final_metrics"]}, flush=True)
