"""images.py: A1111's mask handling, crop regions for "only masked", masked content "fill", resize and fill, and
the outpainting canvas. Expected boxes and sizes are worked out by hand from A1111's code (modules/masking.py,
scripts/poor_mans_outpainting.py), step by step in the comments."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from plainsd import images as imgs


def _mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """White on the pixels x1..x2-1, y1..y2-1 (so that the mask's bounding box is `box`)."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


# (image size, mask's box, padding, drawing width x height, A1111's crop region)
CROP_CASES = [
    # A1111's own example: a 128x32 mask drawn at 512x512 becomes 128x128. Ratio 4 > 1: desired height 128,
    # diff int(128 - 32) = 96, y1 = 200 - 48, y2 = 232 + 48.
    ((512, 512), (100, 200, 228, 232), 0, (512, 512), (100, 152, 228, 280)),
    # bottom-left corner, padding 32: (0, 448, 96, 512), ratio 1.5 < 2: desired width 64 * 2 = 128, diff 32,
    # x1 = -16, x2 = 112; x1 < 0 moves the box right by 16: (0, 128).
    ((512, 512), (0, 480, 64, 512), 32, (512, 256), (0, 448, 128, 512)),
    # padding 4: (6, 26, 54, 38), 48x12, ratio 4 > 1: desired height 48, diff 36, y1 = 26 - 18, y2 = 38 + 18.
    ((64, 64), (10, 30, 50, 34), 4, (64, 64), (6, 8, 54, 56)),
    # 7x50 at ratio 1.5: desired width 50 * 1.5 = 75, diff int(75 - 7) = 68, x1 = 40 - 34, x2 = 47 + 34.
    ((100, 80), (40, 10, 47, 60), 0, (96, 64), (6, 10, 81, 60)),
    # 64x8 on a 64x48 image at 1:1: desired height 64, diff 56, y1 = -28, y2 = 36; moved down: (0, 64), which
    # is past the image's height 48, so cut there.
    ((64, 48), (0, 0, 64, 8), 0, (64, 64), (0, 0, 64, 48)),
    # 20x8 at the bottom: desired height 20, diff 12, y1 = 50, y2 = 70 >= 64: moved up by 6 to (44, 64).
    ((64, 64), (20, 56, 40, 64), 0, (64, 64), (20, 44, 40, 64)),
]


@pytest.mark.parametrize("size, box, padding, drawing, expected", CROP_CASES)
def test_crop_region_is_a1111s(size, box, padding, drawing, expected):
    mask = _mask(size, box)
    region = imgs.crop_region(mask, padding)
    assert region == (max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, size[0]),
                      min(box[3] + padding, size[1]))
    assert imgs.expand_crop_region(region, *drawing, *size) == expected


def test_crop_region_of_a_blank_mask_is_none():
    assert imgs.crop_region(Image.new("L", (32, 32), 0), 8) is None


def test_binary_mask_reads_alpha_as_a1111():
    rgba = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    for x, alpha in enumerate((0, 100, 200, 255)):
        rgba.putpixel((x, 0), (0, 0, 0, alpha))  # black but opaque: alpha is the mask
    assert list(imgs.binary_mask(rgba).getdata()) == [0, 0, 255, 255]  # cut at 128
    assert list(imgs.binary_mask(rgba, round=False).getdata()) == [0, 100, 200, 255]
    opaque = Image.new("RGBA", (2, 1), (255, 255, 255, 255))
    opaque.putpixel((0, 0), (0, 0, 0, 255))
    assert list(imgs.binary_mask(opaque).getdata()) == [0, 255]  # fully opaque: brightness


def test_fill_paints_the_masked_area_with_the_colours_around_it():
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    image.paste((40, 40, 200), (32, 0, 64, 64))  # red left half, blue right half
    image.paste((0, 255, 0), (24, 24, 40, 40))  # a green square, masked
    out = np.asarray(imgs.fill(image, _mask((64, 64), (24, 24, 40, 40))), dtype=np.int16)
    src = np.asarray(image, dtype=np.int16)
    assert np.array_equal(out[:24], src[:24]) and np.array_equal(out[:, :24], src[:, :24])  # unmasked: as it was
    inside = out[24:40, 24:40]
    assert inside[:, :, 1].max() < 60  # no green left
    assert inside[4, 0, 0] > inside[4, -1, 0] and inside[4, -1, 2] > inside[4, 0, 2]  # red near red, blue near blue


def test_resize_and_fill_stretches_the_edges():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8))
    out = np.asarray(imgs.resize(image, 64, 64, "resize and fill"), dtype=np.int16)
    # 64x32 into 64x64: fitted at full width, 16 rows above and below; each band is one row repeated
    assert np.array_equal(out[16:48], np.asarray(image, dtype=np.int16))
    assert (out[:16] == out[0]).all() and (out[48:] == out[63]).all()
    assert not (out[0] == out[63]).all()


@pytest.mark.parametrize("size, sides, canvas, offset", [
    # 64x64, left 16 and right 32: width ceil(112 / 64) * 64 = 128, the 64 extra shared 16:32 -> 21 and 43
    ((64, 64), (16, 32, 0, 0), (128, 64), (21, 0)),
    # 48x40, top 8: height ceil(48 / 64) * 64 = 64, all 24 extra on top; the width (48 -> 64) is not widened
    # by A1111 (its 16 columns stay black there); plainsd draws them as a right side
    ((48, 40), (0, 0, 8, 0), (64, 64), (0, 24)),
])
def test_outpaint_canvas_is_a1111s(size, sides, canvas, offset):
    image = Image.new("RGB", size, (10, 200, 10))
    big, mask, latent_mask = imgs.outpaint_canvas(image, *sides, mask_blur=4)
    assert big.size == mask.size == latent_mask.size == canvas
    assert big.crop((*offset, offset[0] + size[0], offset[1] + size[1])).tobytes() == image.tobytes()
    m, lm = np.asarray(mask), np.asarray(latent_mask)
    x, y = offset
    if sides[0]:  # the image's first column is repainted, its column mask_blur * 2 in is kept (latent: // 2)
        assert m[y + 20, x + 7] == 255 and m[y + 20, x + 8] == 0 and lm[y + 20, x + 1] == 255 and lm[y + 20, x + 2] == 0
    assert m[canvas[1] - 1, canvas[0] - 1] == 255  # a new corner is repainted
    kept = m[y + 8:y + size[1] - 9, x + 8:x + size[0] - 9]
    assert kept.size and (kept == 0).all()
