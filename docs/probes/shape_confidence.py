"""How sure is a model of the shapes it names? Its greedy descriptions (a preference stage's self_pairs/samples.jsonl)
scored by `mllm.course.shape_confidence.shape_word_probs`: for each object sentence, the probability of the shape word
it wrote, and whether that word is misnamed (`self_pairs.owned_shapes`: the one object at the sentence's colour and
place is of another shape). Prints the share of sentences below each probability and how many misnamed ones they hold.

    OMP_NUM_THREADS=1 .venv/bin/python docs/probes/shape_confidence.py model=runs/course18/base/model \
        stage=runs/course18/preference [limit=300]
"""
import json
import sys
from pathlib import Path

from mllm.course.self_pairs import owned_shapes
from mllm.course.shape_confidence import shape_word_probs
from mllm.world.scenes import NAME_TO_CATEGORY

if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    stage = Path(args["stage"])
    scenes = {json.loads(line)["image_id"]: json.loads(line)
              for line in (stage / "fresh_scenes" / "scenes.jsonl").read_text().splitlines()}
    rows = [json.loads(line) for line in (stage / "self_pairs" / "samples.jsonl").read_text().splitlines()]
    rows = rows[:int(args.get("limit", 300))]
    records = []  # (probability of the written shape, misnamed)
    for row, dists in zip(rows, shape_word_probs(args["model"], rows, stage / "fresh_scenes")):
        owned = owned_shapes(row["answer"], scenes[row["metainfos"]["image_id"]])
        if len(owned) == len(dists):
            records += [(dist.get(named, 0.0), truth is not None and NAME_TO_CATEGORY.get(named) != truth)
                        for (_, named, truth), dist in zip(owned, dists)]
    wrong = sum(misnamed for _, misnamed in records)
    print(f"{len(records)} object sentences of {len(rows)} descriptions, {wrong} misnamed shapes")
    for cut in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        below = [misnamed for p, misnamed in records if p < cut]
        print(f"p < {cut}: {len(below)} sentences ({100 * len(below) / len(records):.1f} %), {sum(below)} of the "
              f"{wrong} misnamed")
