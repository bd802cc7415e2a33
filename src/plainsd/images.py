"""Images in and out: PIL <-> tensors in [-1, 1], resize modes, masks, contact sheets."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps

# A1111's resize modes, by its numbers 0-3; the last keeps the init image at its own size for the encoder and
# interpolates its latents to the drawing size (the pipeline does that part)
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill", "just resize (latent upscale)")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images (rounded, as A1111 does)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def resize_mode(mode: str | int) -> str:
    """A resize mode by name or by A1111's number -> its name in RESIZE_MODES."""
    return _named(mode, RESIZE_MODES, "resize mode")


def _named(value: str | int, names: tuple[str, ...], what: str) -> str:
    """One of A1111's choices by name or by its number (its index in names) -> its name."""
    number = isinstance(value, int) and not isinstance(value, bool)
    name = names[value] if number and 0 <= value < len(names) else value
    if name not in names:
        raise ValueError(f"unknown {what} {value!r}; known: {', '.join(names)} (A1111's 0 to {len(names) - 1})")
    return name


def resize(image: Image.Image, width: int, height: int, mode: str | int = "just resize") -> Image.Image:
    """A1111's resize modes: stretch; crop to fill; or fit inside and fill the border by stretching the edge rows
    (or columns) of the fitted image outwards (also the latent upscale mode's, as A1111 resizes a mask for it)."""
    mode = resize_mode(mode)
    image = image.convert("RGB")
    if mode == "just resize":
        return image.resize((width, height), Image.LANCZOS)
    if mode == "crop and resize":
        return ImageOps.fit(image, (width, height), Image.LANCZOS)
    return _resize_and_fill(image, width, height)


def _resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's "resize and fill": the image fitted and centred, each empty band filled by the fitted image's
    nearest edge row or column stretched across it (sizes floored, as A1111 does)."""
    ratio, src_ratio = width / height, image.width / image.height
    w = width if ratio < src_ratio else image.width * height // image.height
    h = height if ratio >= src_ratio else image.height * width // image.width
    inner = image.resize((w, h), Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(inner, (width // 2 - w // 2, height // 2 - h // 2))
    band = height // 2 - h // 2 if ratio < src_ratio else width // 2 - w // 2
    if band > 0 and ratio < src_ratio:  # bands above and below: the top and bottom rows stretched
        out.paste(inner.resize((width, band), box=(0, 0, width, 0)), (0, 0))
        out.paste(inner.resize((width, band), box=(0, h, width, h)), (0, band + h))
    elif band > 0 and ratio > src_ratio:  # bands left and right: the first and last columns stretched
        out.paste(inner.resize((band, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(inner.resize((band, height), box=(w, 0, w, height)), (band + w, 0))
    return out


# A1111's "Masked content" (inpainting_fill 0-3): what the masked area starts from
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")


def inpainting_fill(fill: str | int) -> str:
    """Masked content by name or by A1111's number -> its name in INPAINTING_FILLS."""
    return _named(fill, INPAINTING_FILLS, "masked content (inpainting_fill)")


def binary_mask(mask: Image.Image, round: bool = True) -> Image.Image:
    """A mask as L, white = repaint, as A1111 reads it: an RGBA mask with any transparency is its alpha channel
    (opaque = repaint; cut at half unless round is False), any other mask its brightness."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        alpha = mask.getchannel("A")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round else alpha
    return mask.convert("L")


def blur_mask(mask: Image.Image, blur: int = 4, invert: bool = False, round: bool = True) -> Image.Image:
    """binary_mask, inverted if asked, then blurred (A1111's mask blur), at the mask's own size."""
    m = binary_mask(mask, round)
    if invert:
        m = ImageOps.invert(m)
    return m.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else m


def prepare_mask(mask: Image.Image, width: int, height: int, blur: int = 4, invert: bool = False,
                 round: bool = True, mode: str | int = "just resize") -> Image.Image:
    """blur_mask brought to width x height by the init image's resize mode, as L."""
    m = blur_mask(mask, blur, invert, round)
    return m if m.size == (width, height) else resize(m, width, height, mode).convert("L")


def mask_tensor(mask: Image.Image, width: int, height: int, resample=Image.BILINEAR) -> torch.Tensor:
    """[1, 1, height, width] in [0, 1]."""
    arr = np.asarray(mask.convert("L").resize((width, height), resample), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None, None]


# A1111's "fill": (blur radius, times composited), from the widest blur to none
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's masked content "fill": the masked area painted with the colours around it. The unmasked part,
    premultiplied by its alpha (so that the masked area adds no colour), is blurred less and less and each blur
    composited over the last: far from the edge the wide blurs' average colour remains, near it the sharp ones."""
    unmasked = Image.new("RGBa", image.size)
    unmasked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, times in FILL_LAYERS:
        layer = unmasked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def crop_region(mask: Image.Image, padding: int = 0) -> tuple[int, int, int, int] | None:
    """A1111's crop region for "only masked": the smallest box (x1, y1, x2, y2) holding every pixel of the mask
    that is not black, widened by padding on each side as far as the image goes; None for an all-black mask."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_crop_region(box: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """A1111's expand_crop_region: the box grown on its short side to the width:height ratio it will be drawn at
    (half each way, the odd pixel at the end), moved back inside the image, and cut at the image's far edge if
    it is still larger."""
    x1, y1, x2, y2 = box
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(start: int, end: int, by: int, limit: int) -> tuple[int, int]:
    start, end = start - by // 2, end + by - by // 2
    if end > limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def outpaint_canvas(image: Image.Image, left: int, right: int, top: int, bottom: int,
                    mask_blur: int) -> tuple[Image.Image, Image.Image, Image.Image]:
    """A1111's "Poor man's outpainting": (canvas, mask, latent mask). The canvas is the image widened by the
    sides asked for and rounded up to whole multiples of 64 pixels (the extra shared by those sides in proportion,
    the end side taking the odd pixels), the image on black. The mask is white but for the image, whose black
    rectangle stops mask_blur * 2 pixels short of each widened side (the blur then reaches the edge); the latent
    mask likewise with mask_blur // 2. A side of a dimension that is not widened gets that dimension's rounding
    (A1111 leaves it black and unpainted)."""
    w, h = image.size
    left, right = _sides(w, left, right)
    top, bottom = _sides(h, top, bottom)
    canvas = Image.new("RGB", (w + left + right, h + top + bottom))
    canvas.paste(image.convert("RGB"), (left, top))
    masks = []
    for margin in (mask_blur * 2, mask_blur // 2):
        mask = Image.new("L", canvas.size, 255)
        # (a PIL rectangle includes its last row and column, as in A1111's)
        ImageDraw.Draw(mask).rectangle((left + (margin if left else 0), top + (margin if top else 0),
                                        canvas.width - right - (margin if right else 0),
                                        canvas.height - bottom - (margin if bottom else 0)), fill=0)
        masks.append(mask)
    return canvas, masks[0], masks[1]


def _sides(size: int, before: int, after: int) -> tuple[int, int]:
    """The pixels added before and after a side of `size`, the total rounded up to a multiple of 64."""
    extra = math.ceil((size + before + after) / 64) * 64 - size
    if before == 0 and after == 0:
        return 0, extra
    before = before * extra // (before + after) if before else 0
    return before, extra - before if after else 0


def contact_sheet(frames: list[Image.Image], columns: int = 8) -> Image.Image:
    columns = max(1, min(columns, len(frames)))
    rows = (len(frames) + columns - 1) // columns
    w, h = frames[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, f in enumerate(frames):
        sheet.paste(f, ((i % columns) * w, (i // columns) * h))
    return sheet


# SD 1.x/2.x latent -> RGB, a linear map (A1111's "cheap approximation"), for live previews.
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])


def latent_preview(latents: torch.Tensor, coefficients: torch.Tensor | None = None) -> list[Image.Image]:
    """Scaled latents [B, 4, h, w] -> small RGB previews, without the VAE."""
    coef = LATENT_RGB if coefficients is None else coefficients
    rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu(), coef.float())
    return to_pil(rgb)
