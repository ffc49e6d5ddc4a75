"""Grounding Acc@0.5 of an answers file by image shape and by the patch grid the image processor makes of it.

    .venv/bin/python docs/probes/grounding_by_shape.py runs/course14/grounding/after/answers/rec_test.jsonl \
        [model=mllm/assets/tiny-base]

The tiny preset views one slice of about 112 x 112 pixels: a square image becomes an 8 x 8 patch grid, 128 x 96 a
9-wide, 7-high one, 448 x 112 a 16 x 4 one. The resampler's keys carry absolute (row, column) patch positions, as
MiniCPM-V's do, so a query that stands for one cell of the image has to find it at other positions on each grid.
"""
import json
import sys
from collections import defaultdict

from PIL import Image

from mllm.data.boxes import iou, parse_box
from mllm.model.configuration import MLLMConfig
from mllm.model.image_processing import ImageProcessor

if __name__ == "__main__":
    answers = sys.argv[1]
    args = dict(a.split("=", 1) for a in sys.argv[2:])
    processor = ImageProcessor.from_config(MLLMConfig.from_pretrained(args.get("model", "mllm/assets/tiny-base")).slice)
    grids, hits = {}, defaultdict(list)
    for line in open(answers):
        record = json.loads(line)
        meta = record["metainfos"]
        width, height, box = meta["width"], meta["height"], meta["bbox"]
        truth = [box[0] * 1000 / width, box[1] * 1000 / height, box[2] * 1000 / width, box[3] * 1000 / height]
        parsed = parse_box(record["answer"])
        hit = parsed is not None and iou(list(parsed[0]), truth) >= 0.5
        if (width, height) not in grids:
            rows, cols = processor(Image.new("RGB", (width, height)))["tgt_sizes"][0].tolist()
            grids[(width, height)] = f"{cols}x{rows}"
        ratio = max(width, height) / min(width, height)
        shape = "small" if max(width, height) <= 128 else "extreme (>= 2.5:1)" if ratio >= 2.5 else "large"
        hits[f"{shape}"].append(hit)
        hits[f"  grid {grids[(width, height)]} (columns x rows)"].append(hit)
        hits["all"].append(hit)
    print("| images | expressions | Acc@0.5 |\n|---|---|---|")
    for key in sorted(hits, key=lambda k: (k.startswith("  "), -len(hits[k]))):
        print(f"| {key.strip()} | {len(hits[key])} | {sum(hits[key]) / len(hits[key]):.3f} |")
