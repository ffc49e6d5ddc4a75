"""What a box read from its cell alone can reach (stop 40): each object of fresh scenes boxed at its cell's centre
(the cell `slot_features` gives it) with its true width and height, on grids of 6, 8 and 10 cells a side; Acc@0.5
and mean IoU against the true box.

    .venv/bin/python docs/probes/cell_bound.py
"""
import random

from mllm.data.boxes import iou, pixel_to_grid
from mllm.data.lessons import fresh_scene
from mllm.train.scene_slots import slot_features

rng = random.Random(3)
scenes = [fresh_scene(rng) for _ in range(400)]
for grid in (6, 8, 10):
    ious = []
    for scene in scenes:
        for obj, features in zip(scene.objects, slot_features(scene, grid)):
            x0, y0, x1, y1 = pixel_to_grid(obj.bbox, scene.width, scene.height, square_pad=False)
            row, col = divmod(features[0], grid)
            cx, cy = (col + 0.5) * 1000 / grid, (row + 0.5) * 1000 / grid
            w, h = x1 - x0, y1 - y0  # the size known exactly: only the offset in the cell is unknown
            ious.append(iou([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], [x0, y0, x1, y1]))
    print(f"grid {grid}: {len(ious)} objects, cell centre + true size: Acc@0.5 "
          f"{sum(v >= 0.5 for v in ious) / len(ious):.3f}, mean IoU {sum(ious) / len(ious):.3f}")
