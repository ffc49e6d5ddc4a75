"""What a box read from its cell alone can reach (stop 40): each object of fresh scenes boxed at its cell's centre
with its true width and height, on grids of 6, 8 and 10 cells a side; Acc@0.5 and mean IoU against the true box.

    .venv/bin/python docs/probes/cell_bound.py
"""
import random
from mllm.data.lessons import fresh_scene
from mllm.data.boxes import iou, pixel_to_grid
from mllm.world import scenes as S
rng = random.Random(3)
objs = []
for _ in range(400):
    sc = fresh_scene(rng)
    for o in sc.objects:
        objs.append((sc, o))
for grid in (6, 8, 10):
    hits = ious = 0
    for sc, o in objs:
        x0, y0, x1, y1 = pixel_to_grid(o.bbox, sc.width, sc.height, square_pad=False)
        cx, cy = S.centre(o)
        col, row = min(grid - 1, int(grid * cx / sc.width)), min(grid - 1, int(grid * cy / sc.height))
        gx, gy = (col + 0.5) * 1000 / grid, (row + 0.5) * 1000 / grid
        w, h = x1 - x0, y1 - y0  # the size known exactly, only the offset in the cell unknown
        v = iou([gx - w / 2, gy - h / 2, gx + w / 2, gy + h / 2], [x0, y0, x1, y1])
        hits += v >= 0.5; ious += v
    print(f"grid {grid}: {len(objs)} objects, cell centre + true size: Acc@0.5 {hits/len(objs):.3f}, mean IoU {ious/len(objs):.3f}")
