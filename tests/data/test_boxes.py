"""Box conversions and text formats: hand-worked padding, grid and IoU values; every parse format;
box -> grid -> text -> parse -> pixel round trips for square, wide and tall images."""

from __future__ import annotations

import itertools

import pytest

from mllm.data.boxes import format_box, grid_to_pixel, iou, pad_to_square_offsets, parse_box, pixel_to_grid


def test_pad_offsets():
    assert pad_to_square_offsets(640, 480) == (640, 0, 80)
    assert pad_to_square_offsets(300, 900) == (900, 300, 0)
    assert pad_to_square_offsets(101, 100) == (101, 0, 0)  # (101 - 100) // 2 == 0
    assert pad_to_square_offsets(100, 103) == (103, 1, 0)


def test_pixel_to_grid_hand_worked():
    # 640x480 padded to 640x640 with 80 px on top: y 100 -> (100 + 80) / 640 * 1000 = 281.25 -> 281
    assert pixel_to_grid([64, 100, 320, 400], 640, 480) == [100, 281, 500, 750]
    # without padding each axis has its own scale: y 100 / 480 * 1000 = 208.3 -> 208
    assert pixel_to_grid([64, 100, 320, 400], 640, 480, square_pad=False) == [100, 208, 500, 833]
    # tall 300x900: 300 px padding on the left, x 0 -> 300 / 900 * 1000 = 333.3 -> 333
    assert pixel_to_grid([0, 0, 300, 900], 300, 900) == [333, 0, 666, 1000]
    assert pixel_to_grid([0, 0, 300, 900], 300, 900, grid=100) == [33, 0, 66, 100]


def test_grid_to_pixel_inverse():
    assert grid_to_pixel([100, 281.25, 500, 750], 640, 480) == pytest.approx([64, 100, 320, 400])
    assert grid_to_pixel([0, 0, 1000, 1000], 300, 900) == pytest.approx([-300, 0, 600, 900])
    assert grid_to_pixel([500, 500, 1000, 1000], 640, 480, square_pad=False) == pytest.approx([320, 240, 640, 480])


def test_format_box():
    assert format_box([1, 2, 30, 400]) == "[1,2,30,400]"
    assert format_box([1, 2, 30, 400], "qwen") == "<box>(1,2),(30,400)</box>"
    assert format_box([1, 2, 30, 400], "qwen", ref="the dog") == "<ref>the dog</ref><box>(1,2),(30,400)</box>"
    with pytest.raises(ValueError):
        format_box([1, 2, 3, 4], "xywh")


@pytest.mark.parametrize("text,box,fmt", [
    ("[12,34,560,780]", [12, 34, 560, 780], "plain"),
    ("The dog is at [ 12 , 34, 560 ,780 ] in the image.", [12, 34, 560, 780], "plain"),
    ("[12.5,34,560.25,780]", [12.5, 34, 560.25, 780], "plain"),
    ("[0.1, 0.2, 0.35, 0.4]", [100, 200, 350, 400], "plain_norm"),
    ("Answer: [0.100,0.200,0.300,0.400;0.5,0.5,0.6,0.6] .", [100, 200, 300, 400], "plain_norm"),
    ("[0,0,1,1]", [0, 0, 1, 1], "plain"),  # integers are grid values even when small
    ("<ref>the dog</ref><box>(12,34),(560,780)</box>", [12, 34, 560, 780], "qwen"),
    ("<box>( 12 , 34 ) , ( 560 , 780 )</box>", [12, 34, 560, 780], "qwen"),
    ("<box>(0.1,0.2),(0.3,0.4)</box>", [100, 200, 300, 400], "qwen_norm"),
    ("(12,34),(560,780)", [12, 34, 560, 780], "pair"),
    ("from (12, 34) to (560, 780)", None, None),  # words between the corners: not a box
    ("<Loc12><Loc34><Loc560><Loc780>", [12, 34, 560, 780], "loc"),
    ("<loc_12> <loc_34> <loc_560> <loc_780>", [12, 34, 560, 780], "loc"),
    ("[12,34,560]", None, None),
    ("no box here", None, None),
    ("", None, None),
    ("[560,34,12,780]", None, None),  # x1 < x0
    ("<box>(12,780),(560,34)</box>", None, None),  # y1 < y0
])
def test_parse_box(text, box, fmt):
    parsed = parse_box(text)
    if box is None:
        assert parsed is None
    else:
        assert parsed[0] == pytest.approx(box) and parsed[1] == fmt


def test_iou_hand_worked():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges, no +1 pixel convention
    assert iou([0, 0, 10, 10], [2, 2, 8, 8]) == pytest.approx(36 / 100)
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


@pytest.mark.parametrize("size,square_pad,style", list(itertools.product(
    [(500, 500), (640, 480), (300, 900)], [True, False], ["plain", "qwen"])))
def test_round_trip_within_one_cell(size, square_pad, style):
    width, height = size
    boxes = [[0, 0, width, height], [13.7, 21.2, 250.9, 299.99], [width * 0.3, height * 0.55, width * 0.71, height - 1]]
    for box in boxes:
        grid_box = pixel_to_grid(box, width, height, square_pad=square_pad)
        parsed, _ = parse_box(format_box(grid_box, style))
        back = grid_to_pixel(parsed, width, height, square_pad=square_pad)
        cell_x = (max(size) if square_pad else width) / 1000
        cell_y = (max(size) if square_pad else height) / 1000
        for v, w, cell in zip(back, box, [cell_x, cell_y, cell_x, cell_y]):
            assert w - cell - 1e-9 <= v <= w + 1e-9  # truncation only ever moves a coordinate down
