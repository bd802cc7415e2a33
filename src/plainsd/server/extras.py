"""A1111's Extras through its API: /sdapi/v1/extra-single-image and /sdapi/v1/extra-batch-images (fields and
defaults of its modules/api/models.py), answered as A1111 answers, by plainsd.upscale.extras.

As in A1111, a picture's "parameters" text is kept and the upscaling is written beside it as a "postprocessing" text
("Postprocess upscale by: 2, Postprocess upscaler: R-ESRGAN 4x+"), which html_info also carries. Face restoration
(GFPGAN, CodeFormer) is accepted only at visibility and weight 0: plainsd has none. upscale_first orders the upscaler
and the face restorers, so it changes nothing here; show_extras_results concerns A1111's folder mode, which its API
does not use: the pictures are always returned, as A1111's API returns them.
"""

from __future__ import annotations

import html
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from plainsd import upscale
from plainsd.pnginfo import read_parameters

from .api import BadRequest, Limits, decode_image, encode_png


class ExtrasBaseRequest(BaseModel):
    """A1111's ExtrasBaseRequest."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    resize_mode: Literal[0, 1] = Field(0, description="0: scale by upscaling_resize; 1: to upscaling_resize_w x _h")
    show_extras_results: bool = Field(True, description="A1111's folder mode's; the API always returns the pictures")
    gfpgan_visibility: float = Field(0, ge=0, le=1, description="face restoration: plainsd has none, only 0")
    codeformer_visibility: float = Field(0, ge=0, le=1, description="face restoration: plainsd has none, only 0")
    codeformer_weight: float = Field(0, ge=0, le=1, description="face restoration: plainsd has none, only 0")
    upscaling_resize: float = Field(2, ge=1, le=8, description="the scale, with resize_mode 0")
    upscaling_resize_w: int = Field(512, ge=1, description="the width, with resize_mode 1")
    upscaling_resize_h: int = Field(512, ge=1, description="the height, with resize_mode 1")
    upscaling_crop: bool = Field(True, description="resize_mode 1: cut to exactly that size, centred")
    upscaler_1: str = Field("None", description="a name from /sdapi/v1/upscalers")
    upscaler_2: str = Field("None", description="a name from /sdapi/v1/upscalers, blended in")
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, description="how much of upscaler_2's result")
    upscale_first: bool = Field(False, description="upscale before face restoration (which plainsd has not)")


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field("", description="the picture, base64")


class FileData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="the picture, base64")
    name: str = Field(description="its file name")


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(description="the pictures")


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


def settings(req: ExtrasBaseRequest, folder: str | None) -> upscale.Extras:
    """The request as upscale.Extras, checked (BadRequest with one sentence)."""
    for name in ("gfpgan_visibility", "codeformer_visibility", "codeformer_weight"):
        if getattr(req, name) > 0:
            raise BadRequest(f"{name}: plainsd has no face restoration (GFPGAN, CodeFormer), so only 0 is accepted "
                             f"here, got {getattr(req, name)}")
    extras = upscale.Extras(upscaler_1=req.upscaler_1, upscaler_2=req.upscaler_2,
                            upscaler_2_visibility=req.extras_upscaler_2_visibility, resize_mode=req.resize_mode,
                            upscaling_resize=req.upscaling_resize, upscaling_resize_w=req.upscaling_resize_w,
                            upscaling_resize_h=req.upscaling_resize_h, upscaling_crop=req.upscaling_crop)
    try:
        extras.check(folder)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return extras


def pictures(req: ExtrasBaseRequest, limits: Limits) -> list[Image.Image]:
    """The request's pictures, decoded (the limits of input images), at most max_images of them."""
    if isinstance(req, ExtrasSingleImageRequest):
        return [decode_image(req.image, "image", limits)]
    if not req.imageList:
        raise BadRequest("imageList must hold at least one picture")
    if len(req.imageList) > limits.max_images:
        raise BadRequest(f"imageList may hold at most {limits.max_images} pictures, got {len(req.imageList)}")
    return [decode_image(f.data, f"imageList[{i}]", limits) for i, f in enumerate(req.imageList)]


def check_sizes(images: list[Image.Image], extras: upscale.Extras, limits: Limits) -> None:
    """Each result within the limit of an image's pixels."""
    for image in images:
        w, h = extras.output_size(image.width, image.height)
        if w * h > limits.max_image_pixels:
            raise BadRequest(f"upscaling {image.width}x{image.height} would give {w}x{h}; results may have at most "
                             f"{limits.max_image_pixels} pixels")
        if min(w, h) < 8:
            raise BadRequest(f"upscaling {image.width}x{image.height} would give {w}x{h}; results need at least 8 "
                             f"pixels on a side")


def run(images: list[Image.Image], extras: upscale.Extras, folder: str | None, options: dict,
        precision: str) -> tuple[list[str], str]:
    """Each picture upscaled -> (the base64 PNGs with their parameters kept and the postprocessing text, A1111's
    html_info of the last one)."""
    out, text = [], ""
    for image in images:
        parameters = read_parameters(image)
        result, info = upscale.extras(image, extras, folder, tile=options.get("ESRGAN_tile", upscale.TILE),
                                      tile_overlap=options.get("ESRGAN_tile_overlap", upscale.TILE_OVERLAP),
                                      precision=precision)
        text = upscale.postprocessing_text(info)
        out.append(encode_png(result, parameters, {"postprocessing": text}))
    return out, plaintext_to_html(text)


def plaintext_to_html(text: str) -> str:
    """A1111's ui_common.plaintext_to_html."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def realesrgan_models(folder: str | None) -> list[dict]:
    """A1111's /sdapi/v1/realesrgan-models: name, path, scale of the Real-ESRGAN files there are (its RealESRGAN
    folder, or Real-ESRGAN's own file names in a plain folder)."""
    return [{"name": f.name, "path": str(f.path), "scale": upscale.model_scale(f.path)}
            for f in upscale.list_upscalers(folder).values()
            if f.folder == "RealESRGAN" or f.path.stem in upscale.REALESRGAN_NAMES]
