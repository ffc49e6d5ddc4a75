"""Worked examples of facts sheet §6.4, the strip layout of §6.5 and the image loader's conversions/errors."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.model.image_processing import (
    MAX_IMAGE_PIXELS, ImageProcessor, ensure_divide, find_best_resize, get_refine_size, get_sliced_grid,
    load_image, normalize, reshape_by_patch, slice_image, split_to_patches,
)

# (input w, h), grid, source view (w, h), source tgt (h, w), number of slices, slice (w, h), slice tgt (h, w)
WORKED_EXAMPLES = [
    ((448, 448), None, (448, 448), (32, 32), 0, None, None),
    ((300, 200), None, (546, 364), (26, 39), 0, None, None),
    ((640, 480), [2, 1], (518, 392), (28, 37), 2, (364, 546), (39, 26)),
    ((1000, 600), [2, 1], (574, 350), (25, 41), 2, (406, 490), (35, 29)),
    ((2000, 500), [4, 1], (896, 224), (16, 64), 4, (448, 448), (32, 32)),
    ((1344, 1344), [3, 3], (448, 448), (32, 32), 9, (448, 448), (32, 32)),
]


@pytest.mark.parametrize("size, grid, source, source_tgt, n_slices, slice_size, slice_tgt", WORKED_EXAMPLES)
def test_worked_examples(size, grid, source, source_tgt, n_slices, slice_size, slice_tgt):
    assert get_sliced_grid(size, 9, 448) == grid
    view, slices, got_grid = slice_image(Image.new("RGB", size, (10, 20, 30)), 9, 448, 14)
    assert got_grid == grid and view.size == source
    cells = [c for row in slices for c in row]
    assert len(cells) == n_slices and all(c.size == slice_size for c in cells)
    out = ImageProcessor(max_slice_nums=9, scale_resolution=448, patch_size=14)(Image.new("RGB", size))
    expected_tgt = [list(source_tgt)] + [list(slice_tgt or ())] * n_slices
    assert out["tgt_sizes"].dtype == torch.int32 and out["tgt_sizes"].tolist() == expected_tgt
    assert out["grid"] == grid and out["image_size"] == size
    for strip, (h, w) in zip(out["pixel_values"], expected_tgt):
        assert strip.shape == (3, 14, h * w * 14)


def test_ensure_divide_rounds_half_to_even():
    assert ensure_divide(21, 14) == 28  # 1.5 -> 2
    assert ensure_divide(35, 14) == 28  # 2.5 -> 2 (half to even, not up)
    assert ensure_divide(49, 14) == 56  # 3.5 -> 4
    assert ensure_divide(3, 14) == 14  # never below one patch
    assert ensure_divide(203.0, 2) == 204  # 101.5 -> 102
    assert ensure_divide(201.0, 2) == 200  # 100.5 -> 100


def test_resize_helpers():
    assert find_best_resize((100, 100), 448, 14) == (98, 98)  # small and no upscale: only rounded to patches
    assert find_best_resize((100, 100), 448, 14, allow_upscale=True) == (448, 448)
    assert get_refine_size((1000, 600), [2, 1], 448, 14) == (812, 490)
    assert get_sliced_grid((1000, 600), 9, 448, never_split=True) is None


def test_split_to_patches_is_row_major():
    image = Image.new("L", (30, 20))
    for x, y, value in [(0, 0, 1), (10, 0, 2), (20, 0, 3), (0, 10, 4), (10, 10, 5), (20, 10, 6)]:
        image.putpixel((x, y), value)
    rows = split_to_patches(image, [3, 2])
    assert [[c.getpixel((0, 0)) for c in row] for row in rows] == [[1, 2, 3], [4, 5, 6]]
    assert all(c.size == (10, 10) for row in rows for c in row)


def test_normalize_range_and_values():
    image = Image.new("RGB", (2, 1))
    image.putpixel((0, 0), (0, 255, 51))
    x = normalize(image)
    assert x.shape == (3, 1, 2) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0], torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))


def test_strip_conv_equals_view_conv():
    torch.manual_seed(0)
    view = torch.randn(3, 28, 42)  # 2 x 3 patches
    conv = torch.nn.Conv2d(3, 8, kernel_size=14, stride=14)
    strip = reshape_by_patch(view, 14)
    assert strip.shape == (3, 14, 6 * 14)
    on_strip = conv(strip[None])[0].flatten(1)  # (8, 1, 6) -> (8, 6)
    on_view = conv(view[None])[0].flatten(1)  # (8, 2, 3) -> (8, 6), row-major
    torch.testing.assert_close(on_strip, on_view)
    # patch n = i*cols + j sits at columns n*14 .. n*14+13
    torch.testing.assert_close(strip[:, :, 4 * 14:5 * 14], view[:, 14:28, 14:28])


# ---- loader ------------------------------------------------------------------------------------------------------

def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def test_load_sources(tmp_path):
    image = Image.new("RGB", (5, 4), (1, 2, 3))
    data = _png_bytes(image)
    (tmp_path / "a.png").write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for source in [str(tmp_path / "a.png"), tmp_path / "a.png", data, b64, "data:image/png;base64," + b64, image]:
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (5, 4) and out.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ValueError, match="neither an existing file nor base64"):
        load_image(str(tmp_path / "missing.png"))


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.new("RGBA", (2, 2), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
    (lambda: Image.new("RGBA", (2, 2), (255, 0, 0, 255)), (255, 0, 0)),
    (lambda: Image.new("RGBA", (2, 2), (0, 0, 0, 128)), (127, 127, 127)),  # half black over white
    (lambda: Image.new("LA", (2, 2), (0, 0)), (255, 255, 255)),
    (lambda: Image.new("L", (2, 2), 77), (77, 77, 77)),
    (lambda: Image.new("1", (2, 2), 1), (255, 255, 255)),
    (lambda: Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: Image.fromarray(np.full((2, 2), 65535, np.uint16)), (255, 255, 255)),  # I;16 scaled, not clipped
    (lambda: Image.fromarray(np.full((2, 2), 32896, np.uint16)), (128, 128, 128)),
    (lambda: Image.fromarray(np.full((2, 2), 32896, np.int32)), (128, 128, 128)),  # I holding 16-bit data
    (lambda: Image.fromarray(np.full((2, 2), 200, np.int32)), (200, 200, 200)),  # I holding 8-bit data
    (lambda: Image.fromarray(np.full((2, 2), 0.5, np.float32)), (128, 128, 128)),  # F in [0, 1]
])
def test_mode_conversions(make, expected):
    out = load_image(make())
    assert out.mode == "RGB" and out.getpixel((1, 1)) == expected


def test_palette_with_transparency_goes_on_white():
    image = Image.new("P", (2, 2), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0
    reopened = Image.open(io.BytesIO(_png_bytes(image)))
    assert reopened.mode == "P"
    out = load_image(reopened)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (200, 100, 50)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (6, 3), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes(), quality=100)
    out = load_image(buf.getvalue())
    assert out.size == (3, 6)
    assert out.getpixel((2, 0))[0] > 200  # the top-left corner moved to the top-right


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_broken_images_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ValueError, match="corrupt"):
        load_image(b"this is not an image at all")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_image(str(tmp_path / "bad.jpg"))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _png_bytes(noise)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ValueError, match="above the limit"):  # ours: between our limit and PIL's
        load_image(_png_header(12000, 12000))
    assert 12000 * 12000 > MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="decompression-bomb"):  # PIL's hard limit, translated
        load_image(_png_header(30000, 30000))


def test_fast_strip_path_gives_the_same_floats_as_normalize_then_reshape():
    from mllm.model.image_processing import view_to_strip

    rng = np.random.default_rng(3)
    for h, w in [(14, 14), (28, 70), (112, 42)]:
        view = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert torch.equal(view_to_strip(view, 14), reshape_by_patch(normalize(view), 14))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        view_to_strip(Image.new("RGB", (20, 14)), 14)
