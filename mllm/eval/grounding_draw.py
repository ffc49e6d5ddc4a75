"""Pictures of grounding cases: the image with the ground-truth box (green) and the prediction (red), the
expression as a caption underneath, and a contact sheet of several cases. Pure functions on PIL images."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

GT_COLOUR = (0, 200, 0)
PRED_COLOUR = (230, 0, 0)
MIN_SIDE = 256  # small synthetic images (112 px) are enlarged so boxes and captions stay readable
CAPTION_HEIGHT = 36


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def draw_case(image: Image.Image, caption: str, gt: Sequence[float] | None = None,
              pred: Sequence[float] | None = None, min_side: int = MIN_SIDE) -> Image.Image:
    """A copy of `image` scaled so its short side is at least `min_side`, with the pixel boxes `gt` (green)
    and `pred` (red) drawn, and `caption` written on a white strip below."""
    image = image.convert("RGB")
    scale = max(1.0, min_side / min(image.size))
    size = (round(image.width * scale), round(image.height * scale))
    canvas = Image.new("RGB", (size[0], size[1] + CAPTION_HEIGHT), (255, 255, 255))
    canvas.paste(image.resize(size, Image.Resampling.NEAREST), (0, 0))
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(scale))
    for box, colour in ((gt, GT_COLOUR), (pred, PRED_COLOUR)):
        if box is not None:
            x0, y0, x1, y1 = (v * scale for v in box)
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
    font = _font()
    draw.text((4, size[1] + 4), _fit(draw, caption, font, size[0] - 8), fill=(0, 0, 0), font=font)
    legend = [text for text, box in (("green: ground truth", gt), ("red: prediction", pred)) if box is not None]
    if legend:
        draw.text((4, size[1] + 19), "   ".join(legend), fill=(90, 90, 90), font=_font(11))
    return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut and ended with "..." if it is wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(images: Sequence[Image.Image], columns: int = 4, cell: int = 256) -> Image.Image:
    """Images fitted into `cell` x `cell` tiles (aspect kept), `columns` per row, on white."""
    if not images:
        raise ValueError("no images for the contact sheet")
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for k, image in enumerate(images):
        tile = image.copy()
        tile.thumbnail((cell - 4, cell - 4), Image.Resampling.BILINEAR)
        x = (k % columns) * cell + (cell - tile.width) // 2
        y = (k // columns) * cell + (cell - tile.height) // 2
        sheet.paste(tile, (x, y))
    return sheet
