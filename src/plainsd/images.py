"""Images in and out: PIL <-> tensors in [-1, 1], resize modes, masks, contact sheets."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images (rounded, as A1111 does)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def resize_mode(mode: str | int) -> str:
    """A resize mode by name or by A1111's number -> its name in RESIZE_MODES. A1111's 3, "just resize (latent
    upscale)", resizes the image here as 0 does."""
    numbers = {**dict(enumerate(RESIZE_MODES)), 3: RESIZE_MODES[0]}
    name = numbers.get(mode, mode) if isinstance(mode, int) and not isinstance(mode, bool) else mode
    if name not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; known: {', '.join(RESIZE_MODES)} (A1111's 0, 1, 2; 3 as 0)")
    return name


def resize(image: Image.Image, width: int, height: int, mode: str | int = "just resize") -> Image.Image:
    """A1111's resize modes: stretch, crop to fill, or fit and fill the border by stretching the edges."""
    mode = resize_mode(mode)
    image = image.convert("RGB")
    if mode == "just resize":
        return image.resize((width, height), Image.LANCZOS)
    if mode == "crop and resize":
        return ImageOps.fit(image, (width, height), Image.LANCZOS)
    scale = min(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    inner = image.resize((w, h), Image.LANCZOS)
    out = image.resize((width, height), Image.LANCZOS)  # stretched background fills the border
    out.paste(inner, ((width - w) // 2, (height - h) // 2))
    return out


def prepare_mask(mask: Image.Image, width: int, height: int, blur: int = 4, invert: bool = False) -> Image.Image:
    """A mask as L, white = repaint, resized and blurred (A1111's mask blur)."""
    mask = mask.convert("RGBA")
    # A transparent area in an RGBA mask means "keep"; otherwise brightness is the mask.
    alpha = mask.getchannel("A")
    m = Image.composite(mask.convert("L"), Image.new("L", mask.size, 0), alpha)
    if invert:
        m = ImageOps.invert(m)
    m = m.resize((width, height), Image.LANCZOS)
    if blur > 0:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    return m


def mask_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 1, height, width] in [0, 1]."""
    arr = np.asarray(mask.convert("L").resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None, None]


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
