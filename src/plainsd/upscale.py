"""Upscalers: the model files people use (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT ...) read by spandrel, run in
overlapping tiles, and used as A1111 uses them: in the hires fix, in Extras, in SD upscale.

    upscaler_names("models")                                # "None", "Lanczos", "Nearest", then the model files
    big = upscale(picture, "4x-UltraSharp", 2, "models")    # the model (twice if need be), then Lanczos to 2x
    out, info = extras(picture, Extras(upscaler_1="R-ESRGAN 4x+", upscaling_resize=4), "models")

Where the files are: A1111's layout, one folder holding ESRGAN/, RealESRGAN/, SwinIR/, DAT/, HAT/, ScuNET/ (its
models/ folder; only those subfolders are read), or one folder of upscaler files (--upscalers-dir); the shipped
plainsd-x4 is there without either. Names are as A1111 lists them: a file's stem, and in RealESRGAN/ the names A1111
gives Real-ESRGAN's own files ("R-ESRGAN 4x+" for RealESRGAN_x4plus.pth). Files are .safetensors, or .pth / .pt /
.ckpt read with torch.load(weights_only=True), never unpickling code; spandrel (pip install 'plainsd[upscale]')
recognises the architecture from the tensors.

Running one: the picture as RGB in [0, 1] (spandrel's convention, which ComfyUI and chaiNNer follow; A1111 hands
the models BGR), in tiles of `tile` pixels overlapping by `tile_overlap` (A1111's ESRGAN_tile and
ESRGAN_tile_overlap), placed and blended as A1111's images.split_grid / combine_grid place and blend them (the
blending here in float, before rounding once). bf16 autocast where the CPU multiplies bf16 natively.
"""

from __future__ import annotations

import math
import os
import pickle
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .request import IMAGE_UPSCALERS
from .runtime import native_bf16
from .weights import CheckpointError

# A1111's upscaler folders under its models/ folder (modules/*_model.py: each Upscaler's name is its folder)
FOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "ScuNET")
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
# plainsd's own x4 upscaler for the shipped model (plainsd train upscaler), listed without any folder
SHIPPED = Path(__file__).parent / "data" / "plainsd-x4.safetensors"
# the names A1111 gives Real-ESRGAN's released files (modules/realesrgan_model.py, get_realesrgan_models)
REALESRGAN_NAMES = {
    "realesr-general-x4v3": "R-ESRGAN General 4xV3", "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo", "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B", "RealESRGAN_x2plus": "R-ESRGAN 2x+",
}
TILE, TILE_OVERLAP = 192, 8   # A1111's defaults of ESRGAN_tile and ESRGAN_tile_overlap (pixels of the input)
MAX_PASSES = 3                # A1111's Upscaler.upscale runs a model at most three times to reach a scale
CACHE_SIZE = 2                # upscaler models kept loaded, the most recently used last
# convolution-only architectures, run channels-last (oneDNN's fast layout on CPUs; others may .view() NCHW tensors)
CHANNELS_LAST = ("ESRGAN", "Compact", "SPAN")


@dataclass(frozen=True)
class UpscalerFile:
    """An upscaler model file as the lists show it."""
    name: str      # as A1111 lists it
    path: Path
    folder: str    # the A1111 folder it is in ("ESRGAN", "RealESRGAN", ...), "" in a plain folder, "plainsd" shipped


# --- finding them -------------------------------------------------------------------------------------

def list_upscalers(folder: str | os.PathLike | None = None) -> dict[str, UpscalerFile]:
    """name -> file: the shipped plainsd-x4 (when present), then the model files under folder, sorted by name (any
    case) as A1111 sorts them; the first of two files with one name wins."""
    found = {}
    if SHIPPED.is_file():
        found["plainsd-x4"] = UpscalerFile("plainsd-x4", SHIPPED, "plainsd")
    if folder is None:
        return found
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"upscalers folder {folder} does not exist")
    layout = [folder / name for name in FOLDERS if (folder / name).is_dir()]
    places = [(place, place.name) for place in layout] or [(folder, "")]
    files = []
    for place, kind in places:
        for path in sorted(place.rglob("*")):
            if path.is_file() and path.suffix.lower() in SUFFIXES and not path.name.startswith("."):
                name = REALESRGAN_NAMES.get(path.stem, path.stem) if kind == "RealESRGAN" else path.stem
                files.append(UpscalerFile(name, path, kind))
    for f in sorted(files, key=lambda f: f.name.lower()):
        found.setdefault(f.name, f)
    return found


def upscaler_names(folder: str | os.PathLike | None = None) -> list[str]:
    """Every upscaler by name, in A1111's order: "None", "Lanczos", "Nearest", then the model files."""
    return [*IMAGE_UPSCALERS, *list_upscalers(folder)]


def find_upscaler(name: str, folder: str | os.PathLike | None = None) -> UpscalerFile | None:
    """The model file an upscaler name names (any case, as A1111's SD upscale matches them), or None for "None",
    "Lanczos" and "Nearest"; an unknown name gets one sentence with the names there are."""
    if name in IMAGE_UPSCALERS:
        return None
    available = list_upscalers(folder)
    if isinstance(name, str) and name in available:
        return available[name]
    lower = {n.lower(): f for n, f in available.items()}
    if isinstance(name, str) and name.lower() in lower:
        return lower[name.lower()]
    where = f"in {folder}" if folder is not None else "(no upscalers folder was given: --upscalers-dir)"
    raise ValueError(f"no upscaler named {name!r} {where}; available: {', '.join(upscaler_names(folder))}")


def check_tiling(tile: int, tile_overlap: int) -> None:
    """A1111's ESRGAN_tile (0: no tiling) and ESRGAN_tile_overlap, in pixels of the model's input."""
    if isinstance(tile, bool) or not isinstance(tile, int) or not (tile == 0 or 16 <= tile <= 4096):
        raise ValueError(f"the upscaler tile size (ESRGAN_tile) must be 0 (no tiling) or a whole number of pixels "
                         f"from 16 to 4096, got {tile!r}")
    if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or tile_overlap < 0 \
            or (tile and tile_overlap >= tile):
        raise ValueError(f"the upscaler tile overlap (ESRGAN_tile_overlap) must be a whole number of pixels from 0 to "
                         f"less than the tile size {tile}, got {tile_overlap!r}")


# --- loading them -------------------------------------------------------------------------------------

_LOADED: OrderedDict = OrderedDict()   # (path, size, mtime) -> spandrel ImageModelDescriptor
_LOCK = threading.Lock()


def _spandrel():
    try:
        import spandrel
    except ImportError:
        raise ValueError("upscaler models need spandrel; install it with: pip install 'plainsd[upscale]'") from None
    return spandrel


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An upscaler file's tensors: .safetensors, or a PyTorch file read with weights_only=True, unwrapped from the
    dicts trainers save them in (params_ema, state_dict, ...) as spandrel unwraps them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such upscaler file: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path.name} holds pickled Python objects other than tensors; plainsd reads upscaler "
                              f"files only with weights_only=True and never runs pickled code (convert it to "
                              f".safetensors with a tool you trust): {str(e).splitlines()[0]}") from None
    except Exception as e:  # truncated files, TorchScript archives, not a PyTorch file at all
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path.name} is not a readable upscaler file (.safetensors, or a .pth of tensors): "
                              f"{first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} is not an upscaler: it holds a {type(state).__name__}, not tensors")
    return _spandrel().canonicalize_state_dict(state)


def load_upscaler(path: str | os.PathLike):
    """The spandrel model of an upscaler file (an ImageModelDescriptor: .model, .scale, .architecture ...), loaded
    once and kept (CACHE_SIZE files; a changed file is read again), in float32 and eval mode."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns) if stat else None
    with _LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    spandrel = _spandrel()
    state = read_state_dict(path)
    try:
        model = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise CheckpointError(f"{path.name} is not an upscaler spandrel knows (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, "
                              f"SPAN, ...): its tensors match no architecture") from None
    if not isinstance(model, spandrel.ImageModelDescriptor) or model.purpose == "FaceSR":
        raise CheckpointError(f"{path.name} is a {model.architecture.name} model for {model.purpose.lower()}, not an "
                              f"upscaler of whole pictures")
    if model.input_channels != 3 or model.output_channels != 3:
        raise CheckpointError(f"{path.name} takes {model.input_channels}-channel pictures; plainsd upscales RGB ones")
    model.model.float().eval()
    if model.architecture.id in CHANNELS_LAST:
        model.model.to(memory_format=torch.channels_last)
    with _LOCK:
        _LOADED[key] = model
        while len(_LOADED) > CACHE_SIZE:
            _LOADED.popitem(last=False)
    return model


# --- running them -------------------------------------------------------------------------------------

def positions(size: int, tile: int, overlap: int) -> list[int]:
    """Where A1111's split_grid starts its tiles along a side of `size` pixels: as few tiles as cover the side with
    at least `overlap` pixels shared, spread evenly, the last one flush with the end (one tile when it fits)."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1)
    return [min(int(i * step), size - tile) for i in range(count)]


def _paste(into: torch.Tensor, piece: torch.Tensor, at: int, overlap: int, dim: int) -> None:
    """A1111's combine_grid along one axis: the first tile pasted whole; each later one blended in over its first
    `overlap` pixels (its weight rising linearly from 0), then pasted."""
    n = piece.shape[dim]
    if at == 0 or overlap == 0:
        into.narrow(dim, at, n).copy_(piece)
        return
    shape = [1] * into.dim()
    shape[dim] = overlap
    ramp = (torch.arange(overlap, dtype=into.dtype) / overlap).reshape(shape)
    head = into.narrow(dim, at, overlap)
    head.mul_(1 - ramp).add_(piece.narrow(dim, 0, overlap) * ramp)
    into.narrow(dim, at + overlap, n - overlap).copy_(piece.narrow(dim, overlap, n - overlap))


def tiled(run, image: torch.Tensor, tile_w: int, tile_h: int, overlap: int, scale: int = 1,
          progress: bool = False) -> torch.Tensor:
    """run(tile) on overlapping tiles of image [C, H, W] (at most tile_w x tile_h each, placed as split_grid places
    them), the results (scale times the size) blended together as combine_grid blends them -> [C, H*s, W*s]."""
    from tqdm import tqdm

    c, h, w = image.shape
    tile_w, tile_h = min(tile_w, w), min(tile_h, h)
    xs, ys = positions(w, tile_w, overlap), positions(h, tile_h, overlap)
    out = torch.zeros(c, h * scale, w * scale)
    with tqdm(total=len(xs) * len(ys), desc="upscale tiles", disable=not progress or len(xs) * len(ys) == 1) as bar:
        for y in ys:
            row = torch.zeros(c, tile_h * scale, w * scale)
            for x in xs:
                piece = run(image[:, y:y + tile_h, x:x + tile_w]).float()
                _paste(row, piece, x * scale, overlap * scale, dim=2)
                bar.update(1)
            _paste(out, row, y * scale, overlap * scale, dim=1)
    return out


def _autocast(model, precision: str):
    """bf16 autocast for the model where asked ("bf16"), or where the CPU has native bf16 ("auto")."""
    on = model.supports_bfloat16 and (precision == "bf16" or (precision == "auto" and native_bf16()))
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)


def run_model(model, image: torch.Tensor, tile: int = TILE, tile_overlap: int = TILE_OVERLAP,
              precision: str = "auto", progress: bool = False) -> torch.Tensor:
    """One pass of a spandrel model over image [3, H, W] in [0, 1] -> [3, H*scale, W*scale] in [0, 1], by tiles
    (tile 0: whole)."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):  # (fp16: weights stored so, computed in float32)
        raise ValueError(f"unknown precision {precision!r}; known: auto, bf16, fp16, fp32")
    check_tiling(tile, tile_overlap)

    layout = torch.channels_last if model.architecture.id in CHANNELS_LAST else torch.contiguous_format

    def one(piece):
        with torch.inference_mode(), _autocast(model, precision):
            return model(piece[None].contiguous(memory_format=layout))[0].float().contiguous()

    if tile == 0:
        return one(image)
    return tiled(one, image, tile, tile, tile_overlap, model.scale, progress)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def upscale(image: Image.Image, name: str, scale: float, folder: str | os.PathLike | None = None, *,
            tile: int = TILE, tile_overlap: int = TILE_OVERLAP, precision: str = "auto",
            progress: bool = False) -> Image.Image:
    """A1111's Upscaler.upscale: the picture to scale times its size, rounded down to multiples of 8. A model runs
    at its own scale, again (MAX_PASSES times at most) until the picture is that large, and Lanczos makes up the
    difference; "Lanczos" and "Nearest" resize by scale, then Lanczos to the rounded size; "None" is Lanczos."""
    width, height = int(image.width * scale) // 8 * 8, int(image.height * scale) // 8 * 8
    if width < 8 or height < 8:
        raise ValueError(f"upscaling {image.width}x{image.height} by {scale} gives less than 8 pixels on a side")
    found = find_upscaler(name, folder)
    image = image.convert("RGB")
    if found is None and name != "None":
        image = image.resize((int(image.width * scale), int(image.height * scale)), IMAGE_UPSCALERS[name])
    elif found is not None:
        model = load_upscaler(found.path)
        for _ in range(MAX_PASSES):
            before = image.size
            image = _to_pil(run_model(model, _to_tensor(image), tile, tile_overlap, precision, progress))
            if image.size == before or (image.width >= width and image.height >= height):
                break  # (a 1x model, a restorer, leaves the size as it is: one pass)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return image


def resize(image: Image.Image, width: int, height: int, name: str, folder: str | os.PathLike | None = None,
           **settings) -> Image.Image:
    """A1111's images.resize_image with an upscaler ("just resize"), as its hires fix resizes the first pass's
    picture: upscaled by the larger of the two ratios where that is above 1 (upscale), then Lanczos to exactly
    width x height. settings: upscale's tile, tile_overlap, precision, progress."""
    image = image.convert("RGB")
    if name == "None":
        return image.resize((width, height), Image.LANCZOS)
    ratio = max(width / image.width, height / image.height)
    if ratio > 1.0:
        image = upscale(image, name, ratio, folder, **settings)
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def describe(folder: str | os.PathLike | None = None) -> list[dict]:
    """A1111's /sdapi/v1/upscalers rows (name, model_name, model_path, model_url, scale): the three built-in ones,
    then the model files with the scale their model has (files that do not load: None)."""
    rows = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in IMAGE_UPSCALERS]
    for f in list_upscalers(folder).values():
        rows.append({"name": f.name, "model_name": f.folder or None, "model_path": str(f.path), "model_url": None,
                     "scale": model_scale(f.path)})
    return rows


_SCALES: dict = {}


def model_scale(path: Path) -> int | None:
    """The scale of the model in a file (read once per version of the file), or None where it does not load."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SCALES:
        try:
            _SCALES[key] = load_upscaler(path).scale
        except ValueError:
            _SCALES[key] = None
    return _SCALES[key]



# --- A1111's Extras tab (its "Upscale" postprocessing script) ---------------------------------------------

@dataclass
class Extras:
    """What A1111's Extras upscaling is asked (its API's fields): upscaler_1 scales the picture by upscaling_resize
    (resize_mode 0) or to fill upscaling_resize_w x upscaling_resize_h (resize_mode 1; upscaling_crop then cuts it
    to exactly that size, centred); upscaler_2's result is blended over it with upscaler_2_visibility (0: none).
    upscaler_1 "None" leaves the picture as it is, as A1111 does."""
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    upscaler_2_visibility: float = 0.0
    resize_mode: int = 0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True

    def check(self, folder: str | os.PathLike | None = None) -> None:
        """One sentence for the first thing wrong (A1111's ranges; a name must be in the list)."""
        if self.resize_mode not in (0, 1) or isinstance(self.resize_mode, bool):
            raise ValueError(f"resize_mode must be 0 (scale by upscaling_resize) or 1 (to upscaling_resize_w x "
                             f"upscaling_resize_h), got {self.resize_mode!r}")
        if self.resize_mode == 0 and not 1.0 <= self.upscaling_resize <= 8.0:
            raise ValueError(f"upscaling_resize (the scale) must be between 1 and 8, got {self.upscaling_resize}")
        for side in (self.upscaling_resize_w, self.upscaling_resize_h):
            if self.resize_mode == 1 and (isinstance(side, bool) or not isinstance(side, int) or side < 1):
                raise ValueError(f"upscaling_resize_w and upscaling_resize_h must be whole numbers of pixels, 1 or "
                                 f"more, got {self.upscaling_resize_w}x{self.upscaling_resize_h}")
        if not 0.0 <= self.upscaler_2_visibility <= 1.0:
            raise ValueError(f"extras_upscaler_2_visibility must be between 0 and 1, got {self.upscaler_2_visibility}")
        find_upscaler(self.upscaler_1, folder)
        find_upscaler(self.upscaler_2, folder)
        if self.upscaler_2_visibility > 0 and "None" in (self.upscaler_1, self.upscaler_2):
            raise ValueError("extras_upscaler_2_visibility blends upscaler_2's result into upscaler_1's, and with "
                             "either of them \"None\" there is nothing to blend (as in A1111); name both upscalers or "
                             "leave the visibility at 0")

    def scale_for(self, width: int, height: int) -> float:
        """The scale upscaler_1 is run with for a picture of width x height."""
        if self.resize_mode == 1:
            return max(self.upscaling_resize_w / width, self.upscaling_resize_h / height)
        return self.upscaling_resize

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The size of the result for a picture of width x height."""
        if self.upscaler_1 == "None":
            return width, height
        if self.resize_mode == 1 and self.upscaling_crop:
            return self.upscaling_resize_w, self.upscaling_resize_h
        scale = self.scale_for(width, height)
        return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def extras(image: Image.Image, settings: Extras, folder: str | os.PathLike | None = None,
           **run) -> tuple[Image.Image, dict]:
    """A1111's Extras upscaling of one picture -> (the result, its postprocessing fields as A1111 writes them:
    "Postprocess upscale by" or "Postprocess upscale to" / "Postprocess crop to", "Postprocess upscaler",
    "Postprocess upscaler 2"). run: upscale's tile, tile_overlap, precision, progress."""
    settings.check(folder)
    image = image.convert("RGB")
    if settings.upscaler_1 == "None":
        return image, {}
    info: dict = {}
    first = _extras_upscale(image, settings.upscaler_1, settings, info, folder, run)
    info["Postprocess upscaler"] = _listed_name(settings.upscaler_1, folder)
    if settings.upscaler_2 != "None" and settings.upscaler_2_visibility > 0:
        second = _extras_upscale(image, settings.upscaler_2, settings, info, folder, run)
        first = Image.blend(first, second, settings.upscaler_2_visibility)
        info["Postprocess upscaler 2"] = _listed_name(settings.upscaler_2, folder)
    return first, info


def _listed_name(name: str, folder) -> str:
    found = find_upscaler(name, folder)
    return name if found is None else found.name


def _extras_upscale(image: Image.Image, name: str, settings: Extras, info: dict, folder, run: dict) -> Image.Image:
    """A1111's ScriptPostprocessingUpscale.upscale: by the scale, or to fill the size and cropped (centred)."""
    scale = settings.scale_for(image.width, image.height)
    w, h = settings.upscaling_resize_w, settings.upscaling_resize_h
    if settings.resize_mode == 1:
        info["Postprocess upscale to"] = f"{w}x{h}"
    else:
        info["Postprocess upscale by"] = scale
    out = upscale(image, name, scale, folder, **run)
    if settings.resize_mode == 1 and settings.upscaling_crop:
        canvas = Image.new("RGB", (w, h))
        canvas.paste(out, (w // 2 - out.width // 2, h // 2 - out.height // 2))
        out = canvas
        info["Postprocess crop to"] = f"{w}x{h}"
    return out


def postprocessing_text(info: dict) -> str:
    """The fields as A1111 writes its "postprocessing" PNG text: "Postprocess upscale by: 2, Postprocess upscaler:
    Lanczos"."""
    from .pnginfo import _number, _quote
    return ", ".join(f"{key}: {_quote(_number(value))}" for key, value in info.items() if value is not None)
