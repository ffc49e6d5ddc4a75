"""Yes/no accuracy of an answers file by image shape and question kind (the shapes of grounding_by_shape.py).

    .venv/bin/python docs/probes/yesno_by_shape.py runs/course16/base/yesno_answers.jsonl world=runs/course16/world

Small images are 112 x 112 (an 8 x 8 patch grid, "square") or 128 x 96 and the like (9 x 7, 8 x 7 grids); large
ones are 160-480 pixels a side; extreme ones about 4:1 (16 x 4 grids and the like).
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image


def shape_of(width: int, height: int) -> str:
    if max(width, height) <= 128:
        return "small, square" if width == height else "small, not square"
    return "extreme (>= 2.5:1)" if max(width, height) / min(width, height) >= 2.5 else "large"


if __name__ == "__main__":
    answers = sys.argv[1]
    args = dict(a.split("=", 1) for a in sys.argv[2:])
    world = Path(args["world"])
    sizes, hits = {}, defaultdict(list)
    for line in open(answers):
        record = json.loads(line)
        meta = record["metainfos"]
        if meta["image_path"] not in sizes:
            with Image.open(world / meta["image_path"]) as image:
                sizes[meta["image_path"]] = image.size
        hit = record["answer"].strip().lower().startswith(meta["target"].lower())
        shape = shape_of(*sizes[meta["image_path"]])
        for key in (("all", "all"), ("all", meta["category"]), (shape, "all"), (shape, meta["category"])):
            hits[key].append(hit)
    kinds = ["all", "color", "count", "existence", "position"]
    shapes = sorted({s for s, _ in hits}, key=lambda s: -len(hits[(s, "all")]))
    print("| images | questions | " + " | ".join(kinds) + " |\n|---|---|" + "---|" * len(kinds))
    for shape in shapes:
        cells = [f"{sum(hits[(shape, k)]) / len(hits[(shape, k)]):.3f}" if hits[(shape, k)] else "-" for k in kinds]
        print(f"| {shape} | {len(hits[(shape, 'all')])} | " + " | ".join(cells) + " |")
