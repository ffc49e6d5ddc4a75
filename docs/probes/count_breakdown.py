"""Count answers split by how many objects of the question's category the scene holds: a model that answers every
count question as if the category were there once is right on nearly all questions about a category there once and
on few others, whatever its overall count accuracy.

    .venv/bin/python docs/probes/count_breakdown.py runs/countbench_world runs/cb_tune23/yesno_answers.jsonl [...]

The world is the one the questions were asked on (its scenes.jsonl and yesno_test.json); each answers file is what
`mllm.course.shared.answer_yesno` wrote for it. Prints, per file, right / asked for categories held once, twice and
three or more times, and both questions of a pair right (acc+) for each.
"""
import json
import re
import sys
from collections import Counter
from pathlib import Path

from mllm.world import scenes as S

NAMES = {**{name: name for name in S.CATEGORIES}, **{S.plural(name): name for name in S.CATEGORIES}}
ASKED = re.compile(r"exactly \w+ (\w+) in the image")


def multiplicity(question: dict, scenes: dict) -> int:
    """Objects of the question's category in its scene, capped at 3."""
    text = question["conversations"][0]["content"]
    found = ASKED.search(text)
    if not found or found.group(1) not in NAMES:
        raise ValueError(f"{question['id']}: not a count question this script reads: {text!r}")
    scene = scenes[question["image"]]
    return min(3, sum(o["category"] == NAMES[found.group(1)] for o in scene["objects"]))


if __name__ == "__main__":
    world, answer_files = Path(sys.argv[1]), sys.argv[2:]
    scenes = {}
    for line in (world / "scenes.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            scenes[record["image"]] = record
    questions = {q["id"]: q for q in json.loads((world / "yesno_test.json").read_text())}
    for answers in answer_files:
        right, asked, pairs = Counter(), Counter(), {}
        for line in Path(answers).read_text().splitlines():
            row = json.loads(line)
            meta = row["metainfos"]
            if meta["category"] != "count":
                continue
            question = questions[meta["id"]]
            k = multiplicity(question, scenes)
            hit = row["answer"].strip().lower().startswith(meta["target"].lower())
            right[k] += hit
            asked[k] += 1
            pair = pairs.setdefault(question["image"], [k, True])
            pair[1] &= hit
        both = Counter(k for k, ok in pairs.values() if ok)
        images = Counter(k for k, _ in pairs.values())
        cells = ", ".join(f"{'3+' if k == 3 else k}: {right[k]}/{asked[k]} (acc+ {both[k]}/{images[k]})"
                          for k in sorted(asked))
        print(f"{answers}: {sum(right.values())}/{sum(asked.values())}; by the category's count {cells}")
