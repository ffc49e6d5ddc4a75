"""Pure bounding-box functions shared by grounding data preparation and grounding evaluation.

Conventions (minicpmv_facts §9.4, eval_facts §3.4):
- Pixel boxes are [x0, y0, x1, y1] (xyxy) in the original image, as in Shikra's REC jsonl `bbox`.
- Model-side boxes live on an integer grid 0..`grid` (1000). With `square_pad=True` the image is first padded
  to a centred square of side S = max(w, h) (offsets (S-w)//2 and (S-h)//2, exactly as the padded image), so
  both axes share one scale; without padding each axis is normalised by its own size (Qwen-VL style).
- pixel -> grid truncates with int(); grid -> pixel is the plain inverse v/grid*S - offset, so a round trip
  lands within one grid cell (S/grid pixels) of the original.
- Text formats: "plain" `[x0,y0,x1,y1]` (no spaces; the exercise's target) and "qwen"
  `<box>(x0,y0),(x1,y1)</box>`, optionally preceded by `<ref>expression</ref>`.
- `parse_box` accepts every common spelling (see its docstring) and returns None for no box or for an
  inverted box (x1 < x0 or y1 < y0), so the caller can count a parse failure.
"""

from __future__ import annotations

import re
from typing import Sequence

Box = list[float]


def pad_to_square_offsets(width: int, height: int) -> tuple[int, int, int]:
    """(S, pad_left, pad_top) of centring a width x height image in an S x S square, S = max(width, height)."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def _frame(width: int, height: int, square_pad: bool) -> tuple[float, float, float, float]:
    """(x scale, y scale, x offset, y offset) of the frame in which grid coordinates are measured."""
    if square_pad:
        side, pad_left, pad_top = pad_to_square_offsets(width, height)
        return side, side, pad_left, pad_top
    return width, height, 0, 0


def pixel_to_grid(box: Sequence[float], width: int, height: int, grid: int = 1000,
                  square_pad: bool = True) -> list[int]:
    """Pixel xyxy box -> integer grid box: shift by the padding, divide by the frame size, x grid, truncate."""
    sx, sy, ox, oy = _frame(width, height, square_pad)
    x0, y0, x1, y1 = box
    return [int((x0 + ox) / sx * grid), int((y0 + oy) / sy * grid),
            int((x1 + ox) / sx * grid), int((y1 + oy) / sy * grid)]


def grid_to_pixel(box: Sequence[float], width: int, height: int, grid: int = 1000,
                  square_pad: bool = True) -> list[float]:
    """Grid box -> pixel xyxy box in the original image: v / grid * frame size - padding offset."""
    sx, sy, ox, oy = _frame(width, height, square_pad)
    x0, y0, x1, y1 = box
    return [x0 / grid * sx - ox, y0 / grid * sy - oy, x1 / grid * sx - ox, y1 / grid * sy - oy]


def _number_text(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def format_box(box: Sequence[float], style: str = "plain", ref: str | None = None) -> str:
    """Text of a grid box: "plain" -> `[x0,y0,x1,y1]`; "qwen" -> `[<ref>ref</ref>]<box>(x0,y0),(x1,y1)</box>`."""
    x0, y0, x1, y1 = (_number_text(v) for v in box)
    if style == "plain":
        if ref is not None:
            raise ValueError("the plain box style has no referring-expression markup")
        return f"[{x0},{y0},{x1},{y1}]"
    if style == "qwen":
        prefix = f"<ref>{ref}</ref>" if ref is not None else ""
        return f"{prefix}<box>({x0},{y0}),({x1},{y1})</box>"
    raise ValueError(f"unknown box style {style!r} (expected 'plain' or 'qwen')")


_NUM = r"\s*(-?\d+(?:\.\d+)?|-?\.\d+)\s*"
_LOC = re.compile(r"<\s*loc_?(\d+)\s*>", re.IGNORECASE)
_QWEN = re.compile(rf"<box>\s*\({_NUM},{_NUM}\)\s*,?\s*\({_NUM},{_NUM}\)\s*</box>")
_PAIR = re.compile(rf"\({_NUM},{_NUM}\)\s*,?\s*\({_NUM},{_NUM}\)")
_PLAIN = re.compile(rf"\[{_NUM},{_NUM},{_NUM},{_NUM}[\];]")  # ';' ends the first of several Shikra boxes


def parse_box(text: str, grid: int = 1000) -> tuple[Box, str] | None:
    """First box in `text`, on the `grid` scale, with the name of the format that matched; None if none is valid.

    Formats, tried in this order: at least four `<LocN>` tokens ("loc"); `<box>(x0,y0),(x1,y1)</box>` ("qwen");
    `(x0,y0),(x1,y1)` ("pair"); `[x0,y0,x1,y1]` ("plain"). Spaces may surround numbers. Numbers may be integers
    or decimals; when any is written with a decimal point and all lie in [0, 1] the box is taken as normalised
    and scaled by `grid` (the format name then ends in "_norm"). An inverted box returns None.
    """
    locs = _LOC.findall(text)
    if len(locs) >= 4:
        numbers, fmt = [float(v) for v in locs[:4]], "loc"
    else:
        for fmt, pattern in (("qwen", _QWEN), ("pair", _PAIR), ("plain", _PLAIN)):
            match = pattern.search(text)
            if match:
                break
        else:
            return None
        raw = match.groups()
        numbers = [float(v) for v in raw]
        if any("." in v for v in raw) and all(0.0 <= v <= 1.0 for v in numbers):
            numbers, fmt = [v * grid for v in numbers], fmt + "_norm"
    x0, y0, x1, y1 = numbers
    if x1 < x0 or y1 < y0:
        return None
    return numbers, fmt


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (continuous areas, no +1); 0 when the union is empty."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
