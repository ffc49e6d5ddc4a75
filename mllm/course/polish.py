"""The base's last stage, `polish`: rounds of on-policy correction of its own descriptions, after tune.

After tune the base names the first object of a scene right and then repeats it ("A small red moon is in the top
left. A small red moon is in the center. ..."), though its sampled descriptions name far more of the scene
(course13's base, 6,000 samples of fresh scenes: Recall 72.8, CHAIRi 2.2; greedy on the bench: Recall 47.2).
Teacher-forced training on the world's true descriptions never shows it its own repeats. Each round here:

    fresh scenes (a seed of the round's own)  -> the model's greedy description of each
    `self_pairs.continuation_pairs` (cut)     -> chosen: the description up to its first error, then the scene's
                                                 objects not yet named; rejected: the description as written, cut
                                                 after its first wrong word (`self_pairs.cut_at_error`)
    + `self_pairs.yesno_anchor_pairs`         -> yes/no questions of those scenes, the true answer chosen (without
                                                 them a round unlearns the short answers: yes/no 0.808 -> 0.648)
    + `self_pairs.box_anchor_pairs`           -> their referring expressions, the true box chosen against another
                                                 object's (without them three rounds took grounding 0.282 -> 0.000)
    DPO with an SFT term on the chosen side (`preference.align`, the preference stage's machinery and defaults)

and the next round starts from this one's model, describing new scenes. Measured from course13's tune (bench
CHAIRi / Recall, yes/no acc / acc+, grounding Acc@0.5; docs/probes/README.md, "Stop 44" and "Stop 45"): 3.5 / 47.2,
0.808 / 0.637, 0.282 -> two rounds of 800 steps on cut pairs (course15, the base shipped since stop 45): 2.6 / 75.8,
0.878 / 0.810, 0.260. Whole-text pairs at 400 steps a round (stop 44's base) reached 2.7 / 65.6, 0.872 / 0.800, 0.204
and wrote a question's text where a place should stand in 128 of 300 descriptions ("... is in the image? answer in
the image?"): every rejected token after the error was pushed down, the places of the sentences that follow too.
Each round's evaluation reports that share (`Echo`).

Every round resumes: a finished round (its done.json, with the settings it ran and the fingerprint of the model it
started from) is reused; one of other settings or from another model (`tune` retrained) is refused, naming its
folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from mllm.course.preference import FULL, QUICK, align
from mllm.course.shared import answer_yesno, describe_and_score, ground_and_score
from mllm.jsonio import write_json_atomic
from mllm.model.checkpoint import model_fingerprint

ROUND_SEED = 7919  # round r describes scenes of seed + r * ROUND_SEED (+1): none of the world's, none of another's


def round_settings(budget, r: int = 1) -> dict:
    """`preference.align`'s settings for round r (from 1): the preference stage's defaults (QUICK for a small world),
    the continuation pairs cut after their first wrong word, and the budget's polish sizes and anchors."""
    defaults = QUICK if budget.n_train < 1000 else FULL
    yesno = budget.polish_yesno_anchors
    if not yesno:
        raise ValueError("Budget.polish_yesno_anchors needs at least one value (yes/no pairs per description pair)")
    return defaults | {"pairs": "self", "pair_mode": "cut", "pair_scenes": "fresh",
                       "pair_images": budget.polish_images, "steps": budget.polish_steps,
                       "yesno_anchors": yesno[min(r, len(yesno)) - 1], "box_anchors": budget.polish_anchors} \
        | ({"count_anchors": budget.polish_count_anchors} if budget.polish_count_anchors else {})


def polish(model_dir: Path, world: Path, stage: Path, budget, seed: int) -> tuple[Path, list[dict]]:
    """Budget.polish_rounds rounds from `model_dir` under stage/round{r}; returns the last round's model folder
    (`model_dir` itself for no rounds) and the curve: one entry per round (cumulative CPU-minutes, held-out yes/no
    per kind, bench Recall, grounding Acc@0.5)."""
    curve, cpu_minutes = [], 0.0
    for r in range(1, budget.polish_rounds + 1):
        settings = round_settings(budget, r)
        folder = stage / f"round{r}"
        done = folder / "done.json"
        start = {"model": str(model_dir), "weights": model_fingerprint(model_dir)[:16]}
        if done.is_file():
            record = json.loads(done.read_text())
            if record["settings"] != settings or record["started_from"] != start:
                raise ValueError(f"{folder}: a finished round of other settings or from another model "
                                 f"({record['settings']}, from {record['started_from']}; this one: {settings}, from "
                                 f"{start}); move it aside to train this one")
            print(f"polish: reusing the finished round {r} in {folder}", flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)  # an interrupted round starts again (a few minutes)
            folder.mkdir(parents=True)
            started = time.process_time()
            result = align(model_dir, world, folder, settings, seed + r * ROUND_SEED)
            model = Path(result["model_dir"])
            evaluation = folder / "eval"
            evaluation.mkdir()
            chair = describe_and_score(model, world, evaluation, limit=budget.eval_limit)
            yesno = answer_yesno(model, world, evaluation, limit=budget.eval_limit)
            kinds = json.loads((evaluation / "yesno.json").read_text()).get("categories", {})
            grounding = ground_and_score(model, world, evaluation, limit=budget.eval_limit)
            record = {"round": r, "settings": settings, "started_from": start, "pairs": result["pairs"],
                      "cpu_minutes": round((time.process_time() - started) / 60, 2), "chair": chair,
                      "yesno": yesno, "yesno_kinds": {k: round(v["acc"], 3) for k, v in kinds.items()},
                      "grounding": grounding["accuracy"]}
            write_json_atomic(done, record)
            print(f"polish round {r}: {result['pairs']} pairs, Recall {100 * chair['Recall']:.1f}, CHAIRi "
                  f"{100 * chair['CHAIRi']:.1f}, echoing a prompt {100 * chair['Echo']:.1f} %, yes/no "
                  f"{yesno['acc']:.3f} {record['yesno_kinds']}, grounding {record['grounding']:.3f}", flush=True)
        cpu_minutes += record["cpu_minutes"]
        curve.append({"cpu_minutes": cpu_minutes, "yesno": record["yesno_kinds"] | {"all": record["yesno"]["acc"]},
                      "recall": record["chair"]["Recall"]}
                     | ({"ground": {"acc": record["grounding"]}} if "grounding" in record else {}))
        model_dir = folder / "model"
    return model_dir, curve
