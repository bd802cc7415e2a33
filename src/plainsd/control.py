"""ControlNet units in a generation, as A1111's ControlNet extension (Mikubill/sd-webui-controlnet) drives them.

    engine = runtime.prepare(sd)   # an Engine keeps loaded ControlNets from one request to the next
    result = generate(engine, GenerationRequest("a red circle", controlnet=(
        ControlUnit("plainsd-base.controlnet-canny", edges, module="canny"),)))

1. Models (list_controlnets, find_controlnet): the shipped ControlNet and the files of a ControlNet folder (the
   extension's models/ControlNet), by name; loaded once and kept on the Engine (controlnets). A file there may
   also be a T2I-Adapter (weights.load_control_model tells them apart by their keys, as the extension does).
2. Hints (detected_map, hint_tensor): each unit's picture (in img2img and inpainting without one, the init image,
   with img2img's resize mode, as the extension does) through its preprocessor once, at processor_res (or the pixel
   perfect resolution for the first pass's size), then fitted to each pass's size: the hires pass gets the same
   detected map at its own size. With inpainting's "only masked" the picture is first cut to the mask's box.
3. The model call (ControlledUNet): what each pass calls as its UNet. For every call it finds the step (from the
   noise level), runs the units active at that step and hands the sum of their scaled residuals to the UNet
   (`control=`). The extension's rules (scripts/hook.py, scripts/controlnet.py):
   - Active steps: A1111 counts the step from its step callback, which runs after each step's model call, so a
     call during step i (0-based) sees i - 1 (0 during the first); the unit is on unless that / the pass's steps
     is below guidance_start or above guidance_end. Each pass (img2img's last `strength` of the steps, the hires
     pass) counts its own steps. By the noise level a sampler's extra calls inside a step count as that step and
     Heun's correction (made after the callback) as the next, as in A1111.
   - "Balanced": every residual times the weight, for both halves of the classifier-free guidance batch.
   - "My prompt is more important" (soft injection): residual i of n times weight * 0.825 ** (n - 1 - i), so the
     deep ones count most (0.825 ** (12 - i) for SD 1.x's 13); both halves.
   - "ControlNet is more important" (soft injection and cfg injection): the same soft weights, and the
     unconditional half gets no residuals, so that guidance pushes towards the control.
   - The hires pass of a canny or mlsd unit always uses the soft weights (the extension does so to keep thin
     edges from leaving artefacts at the larger size).
   - Several units: the sum of their residuals. A unit of weight 0 is not run (it would add zeros).
   The ControlNet sees the UNet's text for each row of the batch, its timesteps, an SDXL UNet's vector of pooled
   text and sizes, and (inpainting UNets: 9 input channels) the first 4 channels of its input.
   T2I-Adapter units follow the same rules of steps, weight and halves, with the extension's adapter branches: the
   features depend on the hint alone, so each pass computes them once (at its first active call; the extension
   computes them once per job and resizes them for the hires pass, here that pass computes its own from its hint);
   soft injection scales the levels by weight * (0.25, 0.62, 0.825, 1.0) (fewer levels: the last ones); the sum
   over the adapter units goes to the UNet as `adapter=`, added on the way down where diffusers' UNet and the
   extension add it (unet.adapter_taps: input blocks 2, 5, 8, 11 in SD; 3, 5, 8 and the middle block in SDXL),
   beside the ControlNet units' `control=`. Their sizes match the UNet's at every size the pipeline makes
   (multiples of 8 px): both halve rounding up. Grey (sketch) adapters read the hint's first channel, as the
   extension gives them.
4. Combinations: token merging merges the UNet's tokens only; the ControlNet runs unmerged, as in A1111 (tomesd
   patches the diffusion model alone). Fast mode's DeepCache works: a cheap call runs the ControlNet's first blocks
   only and adds their residuals to the skips it runs; a whole call, all of them; adapter features reach the input
   blocks a call runs. The OpenVINO-compiled UNet takes no residuals: ControlNet units (adapters too) need the eager
   backend (check_combination).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import detectors, runtime, weights
from . import lora as lora_mod
from . import images as imgs
from .diffusion.guidance import step_at
from .models.t2i_adapter import T2IAdapter
from .models.unet import adapter_taps
from .request import CONTROL_MODES, CONTROL_RESIZE_MODES, ControlUnit, GenerationRequest

# --- 1. models ------------------------------------------------------------------------------------------------

# The shipped ControlNet, beside the shipped model
SHIPPED = Path(__file__).parent / "data" / "plainsd-base.controlnet-canny.safetensors"
# The file kinds the extension lists (global_state.CN_MODEL_EXTS, less .bin, which is a pickle of any kind)
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")


def list_controlnets(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """name -> path: the shipped ControlNet (when present), then the ControlNet files and diffusers ControlNet
    folders (a config.json beside the weights) under folder, subfolders included. Names are file or folder stems,
    as the extension lists them before their "[hash]"; the first of two files with one stem wins."""
    found = {SHIPPED.name.removesuffix(".safetensors"): SHIPPED} if SHIPPED.is_file() else {}
    if folder is None:
        return found
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"ControlNet folder {folder} does not exist")
    for p in sorted(folder.rglob("*")):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix in CONTROLNET_SUFFIXES and not (p.parent / "config.json").is_file():
            found.setdefault(p.stem, p)
        elif p.is_dir() and (p / "config.json").is_file():
            found.setdefault(p.name, p)
    return found


def model_hash(path: str | os.PathLike) -> str:
    """A1111's short model hash, which the extension shows after each name: the first 8 hex digits of the SHA-256
    of the 64 KiB at offset 1 MiB (of a diffusers folder's weights file)."""
    path = Path(path)
    if path.is_dir():  # (a diffusers folder: its weights, safetensors first)
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise ValueError(f"the ControlNet folder {path} holds no weights file")
        path = files[0]
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def controlnet_titles(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """"name [hash]" -> path, the extension's model list (its /controlnet/model_list names)."""
    return {f"{name} [{model_hash(path)}]": path for name, path in list_controlnets(folder).items()}


def find_controlnet(model: str, folder: str | os.PathLike | None = None) -> Path:
    """The file (or diffusers folder) a unit's model names: a name from list_controlnets, with or without the
    extension's " [hash]" after it (any case), or a path."""
    available = list_controlnets(folder)
    name = model.rsplit(" [", 1)[0] if model.endswith("]") else model
    if name in available:
        return available[name]
    lower = {n.lower(): p for n, p in available.items()}
    if name.lower() in lower:
        return lower[name.lower()]
    if Path(model).exists():
        return Path(model)
    where = f"in {folder} or " if folder is not None else ""
    raise ValueError(f"no ControlNet named {model!r} {where}among the shipped ones (a ControlNet folder: "
                     f"--controlnet-dir); available: {', '.join(available) or 'none'}; or give a file's path")


def check_combination(req: GenerationRequest, backend: str) -> None:
    """What ControlNet units cannot be combined with: the OpenVINO-compiled UNet (it takes no residuals)."""
    if req.controlnet and backend != "eager":
        raise ValueError("ControlNet units need the eager UNet: the OpenVINO-compiled one cannot take the "
                         "ControlNet's residuals (leave out the openvino backend, or the units)")


CACHE_SIZE = 2   # ControlNets kept loaded (more while one request uses more; the extension's default)


def _make_room(cache, wanted: set) -> None:
    """Before another network is read: drop the least recently used ones the request does not name until one more
    fits in CACHE_SIZE (the extension, too, frees a cached model before building the next)."""
    for key in [k for k in cache if k not in wanted]:
        if len(cache) < CACHE_SIZE:
            return
        del cache[key]


def load_controlnets(engine, units: tuple[ControlUnit, ...], folder=None) -> list:
    """Each unit's ControlNet (or T2I-Adapter), loaded once and kept on the engine (engine.controlnets: path ->
    network, the most recently used last), checked against the engine's UNet."""
    cache = engine.controlnets
    paths = [find_controlnet(unit.model, folder).resolve() for unit in units]
    keys = [(str(path), path.stat().st_mtime_ns) for path in paths]
    wanted, nets = set(keys), []
    for unit, path, key in zip(units, paths, keys):
        if key not in cache or not _fits_weights(cache[key], engine):
            cache.pop(key, None)
            _make_room(cache, wanted)
            # read in the dtype the model's weights came in (fp16 where they stay fp16: no float32 copy on the way)
            net = weights.load_control_model(path, dtype=engine.load_dtype, unet=engine.sd.unet)
            if getattr(net, "control_lora", False):
                net.built_with = lora_mod.worn(engine.sd)
            cache[key] = runtime.prepare_controlnet(net.eval(), engine)
        cache.move_to_end(key)
        _check_fits(cache[key], engine.sd.unet.config, unit.model)
        nets.append(cache[key])
    while len(cache) > max(CACHE_SIZE, len(set(map(id, nets)))):
        cache.popitem(last=False)
    return nets


def _fits_weights(net, engine) -> bool:
    """Whether a kept network still fits the model's weights: a Control-LoRA is built on the UNet's as they were,
    with the LoRAs the model wore then (weights.load_control_lora), and is built again for another set."""
    return not hasattr(net, "built_with") or lora_mod.wears(engine.sd, net.built_with)


def _check_adapter_fits(adapter: T2IAdapter, unet_cfg, name: str) -> None:
    """A T2I-Adapter's feature maps (channels, how many times smaller than the latent) must be the UNet's features
    where they go (unet.adapter_taps: one per level, and maybe one for the middle block)."""
    want = [(ch, scale) for _, ch, scale in adapter_taps(unet_cfg)]
    got = list(zip(adapter.config.channels, adapter.scales()))
    if not len(want) - 1 <= len(got) <= len(want):
        raise ValueError(f"the T2I-Adapter {name!r} gives {len(got)} feature maps; this model's UNet takes "
                         f"{len(want) - 1} (or {len(want)}, the last for its middle block)")
    if got != want[:len(got)]:
        raise ValueError(f"the T2I-Adapter {name!r} is for another kind of model: its feature maps have (channels, "
                         f"times smaller than the latent) {got}; this model's UNet takes {want[:len(got)]} (an SD "
                         "1.x / 2.x adapter needs an SD 1.x / 2.x model, an SDXL one an SDXL base model)")


def _check_fits(net, unet_cfg, name: str) -> None:
    """A ControlNet's copy of the UNet must match the UNet it steers (its residuals go onto the UNet's skips); a
    T2I-Adapter's maps, the UNet's features where they go. (An adapter has no text width: SD 1.x and 2.x UNets,
    alike in channels, both take one, as the extension lets them.)"""
    cfg = net.config
    if isinstance(net, T2IAdapter):
        _check_adapter_fits(net, unet_cfg, name)
        return
    if cfg.in_channels != unet_cfg.in_channels and not (cfg.in_channels == 4 and unet_cfg.in_channels == 9):
        raise ValueError(f"the ControlNet {name!r} reads {cfg.in_channels} latent channels and this model's UNet "
                         f"{unet_cfg.in_channels}; it needs the same, or 4 beside an inpainting model's 9")
    same = ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels")
    if any(getattr(cfg, f) != getattr(unet_cfg, f) for f in same):
        mine = ", ".join(f"{f} {getattr(cfg, f)}" for f in same)
        theirs = ", ".join(f"{f} {getattr(unet_cfg, f)}" for f in same)
        raise ValueError(f"the ControlNet {name!r} is for another kind of model ({mine}); this model's UNet has "
                         f"{theirs} (an SD 1.x ControlNet needs an SD 1.x model, an SD 2.x one an SD 2.x model, "
                         "an SDXL one an SDXL base model)")


def unit_title(unit: ControlUnit, folder=None) -> str:
    """The unit's model as the extension names it in the infotext: "name [hash]"."""
    path = find_controlnet(unit.model, folder)
    listed = {p.resolve(): n for n, p in list_controlnets(folder).items()}
    name = listed.get(path.resolve(), path.stem if path.is_file() else path.name)
    return f"{name} [{model_hash(path)}]"


# --- 2. hints -------------------------------------------------------------------------------------------------

def _source(unit: ControlUnit, req: GenerationRequest, box: tuple | None) -> tuple[Image.Image, str]:
    """The picture a unit's preprocessor reads and the resize mode that fits it: the unit's own image, else
    (img2img, inpainting) the init image with img2img's resize mode ("just resize (latent upscale)" as "Just
    Resize"), as the extension chooses. With "only masked" (box) the picture is brought to the init image's size,
    cut to the box and fitted to the drawing size, as the extension crops it (try_crop_image_with_a1111_mask)."""
    if unit.image is not None:
        image, resize = unit.image.convert("RGB"), unit.resize
    else:
        image = req.init_image.convert("RGB")
        resize = CONTROL_RESIZE_MODES[imgs.RESIZE_MODES.index(imgs.resize_mode(req.resize_mode)) % 3]
    if box is not None:
        mode = imgs.RESIZE_MODES[CONTROL_RESIZE_MODES.index(resize)]
        image = imgs.resize(image, *req.init_image.size, mode).crop(box)
        image = imgs.resize(image, req.width, req.height, "resize and fill")
    return image, resize


def detected_map(unit: ControlUnit, req: GenerationRequest, box: tuple | None = None) -> tuple[Image.Image, str]:
    """(the unit's preprocessed picture, its resize mode): the preprocessor at processor_res, or with pixel_perfect
    at the resolution that fits the first pass's width x height."""
    image, resize = _source(unit, req, box)
    resolution = unit.processor_res
    if unit.pixel_perfect:
        resolution = detectors.pixel_perfect_resolution(image, req.width, req.height, resize)
    return detectors.detect(unit.module, image, resolution, unit.threshold_a, unit.threshold_b), resize


def hint_tensor(detected: Image.Image, width: int, height: int, resize: str) -> torch.Tensor:
    """A detected map fitted to width x height by the unit's resize mode -> [1, 3, height, width] in [0, 1]."""
    fitted = detectors.fit(detected, width, height, resize).convert("RGB")
    if fitted.size != (width, height):
        raise ValueError(f"the preprocessor's picture was fitted to {fitted.size}, not {width}x{height}")
    return torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def hint_image(hint: torch.Tensor) -> Image.Image:
    """The picture a hint tensor was made from (hint_tensor's inverse, exact): the extension's detected map."""
    return Image.fromarray((hint[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


# --- 3. the model call ----------------------------------------------------------------------------------------

SOFT_BASE = 0.825   # the extension's soft injection: residual i of n times weight * 0.825 ** (n - 1 - i)
ADAPTER_SOFT = (0.25, 0.62, 0.825, 1.0)   # its soft injection for a T2I-Adapter's four levels, times the weight


@dataclass
class ActiveUnit:
    """A unit ready for one pass: its network (a ControlNet or a T2I-Adapter), its hint at the pass's size, and how
    its residuals (an adapter's features) are weighted."""
    net: torch.nn.Module
    hint: torch.Tensor               # [1, 3, H, W] in [0, 1]
    weight: float
    start: float
    end: float
    soft: bool                       # soft injection: the deep residuals count most
    cond_only: bool                  # cfg injection: the unconditional half gets none
    features: list | None = field(default=None, repr=False)   # an adapter's, computed once for the pass

    @property
    def is_adapter(self) -> bool:
        return isinstance(self.net, T2IAdapter)

    def scales(self, n: int) -> list[float]:
        """The factor of each of the n residuals (an adapter's n levels)."""
        if self.soft and self.is_adapter:  # (more than four levels: the first factor for the extra shallow ones)
            return [self.weight * ADAPTER_SOFT[max(i + len(ADAPTER_SOFT) - n, 0)] for i in range(n)]
        if self.soft:
            return [self.weight * SOFT_BASE ** float(n - 1 - i) for i in range(n)]
        return [self.weight] * n

    def adapter_features(self) -> list[torch.Tensor]:
        """An adapter's unscaled features for this pass's hint, computed on the first call only."""
        if self.features is None:
            hint = self.hint[:, :self.net.config.hint_channels]  # grey adapters: the first channel, as the extension
            with torch.no_grad():
                self.features = self.net(hint)
        return self.features

    def active(self, step: int, steps: int) -> bool:
        """Whether the unit runs on a model call during `step` (0-based) of a pass of `steps` steps: A1111's
        sampling step as that call sees it (the last finished step's number, 0 in the first) as a fraction."""
        seen = max(step - 1, 0) / steps
        return not (seen < self.start or seen > self.end)


def active_units(units: tuple[ControlUnit, ...], nets: list, hints: list[torch.Tensor],
                 hires: bool = False) -> list[ActiveUnit]:
    """The units with their networks and this pass's hints (units of weight 0 left out: they add nothing)."""
    out = []
    for unit, net, hint in zip(units, nets, hints):
        if unit.weight == 0:
            continue
        mode = CONTROL_MODES.index(unit.mode)
        forced_soft = hires and ("canny" in unit.module or "mlsd" in unit.module)
        out.append(ActiveUnit(net, hint, float(unit.weight), unit.guidance_start, unit.guidance_end,
                              soft=mode != 0 or forced_soft, cond_only=mode == 2 or getattr(net, "global_pool", False)))
    return out


class ControlledUNet:
    """What a pass calls as its UNet when a request has ControlNet units: unet(x, t, context) with the active
    units' residuals added (module docstring, 3).

    ts: the UNet timesteps of the pass's steps (its sigmas but the last, in the sampler's order), to find a call's
    step. batch, parts: the images of a batch and the prompt's AND parts; the guidance batch (diffusion.guidance.
    CFGDenoiser) holds the unconditional rows first, then each part's, so a call of (parts + 1) x batch rows is
    guided and its first `batch` rows are the unconditional half. Calls the UNet with control= a list of residuals,
    or, for fast mode's DeepCacheUNet, a function of how many input blocks the call runs (None: all); with
    adapter= the adapter units' summed features (each only where units of that kind are active)."""

    def __init__(self, unet, units: list[ActiveUnit], ts: torch.Tensor, batch: int, parts: int, lazy: bool = False):
        self.unet, self.units, self.ts = unet, units, ts.float()
        self.batch, self.parts, self.lazy = batch, parts, lazy

    def reset(self) -> None:
        """A new batch or pass: fast mode's DeepCache starts again (pipeline._sample)."""
        if hasattr(self.unet, "reset"):
            self.unet.reset()

    def step(self, t: torch.Tensor) -> int:
        """The pass's step a call at timestep t belongs to: the last step whose timestep is at or above it."""
        return step_at(self.ts, float(torch.as_tensor(t).reshape(-1).max()))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, guidance=None,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        """guidance: an LCM-distilled UNet's guidance scale (UNetModel.forward), passed on to it (the ControlNets,
        which have no guidance embedding, do not get it). y: an SDXL UNet's vector, which its ControlNets read
        too."""
        step, steps = self.step(t), len(self.ts)
        units = [u for u in self.units if u.active(step, steps)]
        extra = {} if guidance is None else {"guidance": guidance}
        if y is not None:
            extra["y"] = y
        if not units:
            return self.unet(x, t, context, **extra)
        cond_mark = torch.ones(x.shape[0], 1, 1, 1, device=x.device)
        if x.shape[0] == (self.parts + 1) * self.batch:
            cond_mark[:self.batch] = 0

        nets = [u for u in units if not u.is_adapter]
        adapters = [u for u in units if u.is_adapter]
        if nets:
            def control(stop: int | None = None) -> list[torch.Tensor]:
                return _residuals(nets, x, t, context, cond_mark, stop, y)

            extra["control"] = control if self.lazy else control()
        if adapters:
            extra["adapter"] = _adapter_sum(adapters, x, cond_mark)
        return self.unet(x, t, context, **extra)


def _residuals(units: list[ActiveUnit], x, t, context, cond_mark, stop: int | None, y=None) -> list[torch.Tensor]:
    """The sum over the units of their scaled residuals (stop: only those of the first `stop` input blocks; y: an
    SDXL UNet's vector)."""
    total = None
    for unit in units:
        x_in = x[:, :4] if x.shape[1] == 9 and unit.net.config.in_channels == 4 else x
        with torch.no_grad():
            out = unit.net(x_in, unit.hint.to(x.device), t, context, stop=stop, y=y)
        full = len(unit.net.zero_convs) + 1
        out = [r * s for r, s in zip(out, unit.scales(full))]
        if unit.cond_only:
            out = [r * cond_mark.to(r.dtype) for r in out]
        total = out if total is None else [a + b for a, b in zip(total, out)]
    return total


def _adapter_sum(units: list[ActiveUnit], x: torch.Tensor, cond_mark: torch.Tensor) -> list[torch.Tensor]:
    """The sum over the adapter units of their scaled features (the unconditional rows left out for cfg injection);
    the maps the UNet takes where unet.adapter_taps says."""
    total = None
    for unit in units:
        features = [f.to(x.device) for f in unit.adapter_features()]
        out = [f * s for f, s in zip(features, unit.scales(len(features)))]
        if unit.cond_only:
            out = [f * cond_mark.to(f.dtype) for f in out]
        total = out if total is None else [_plus(a, b) for a, b in itertools.zip_longest(total, out)]
    return total


def _plus(a, b):
    """a + b, either of which may be None (one adapter's map for the middle block, another's none)."""
    return b if a is None else a if b is None else a + b


# --- the infotext ---------------------------------------------------------------------------------------------

def infotext_fields(units: tuple[ControlUnit, ...], folder=None) -> dict[str, str]:
    """The extension's infotext entries: "ControlNet i" -> "Module: canny, Model: name [hash], Weight: 1.0, ...",
    its fields in its order (ControlNetUnit.infotext_fields), values as Python prints them; thresholds as
    _threshold writes them, the processor resolution as
    the unit gave it (also with pixel perfect, as the extension writes it before computing that)."""
    out = {}
    for i, unit in enumerate(units):
        values = {"Module": unit.module, "Model": unit_title(unit, folder), "Weight": float(unit.weight),
                  "Resize Mode": unit.resize, "Processor Res": unit.processor_res,
                  "Threshold A": _threshold(unit, "a"), "Threshold B": _threshold(unit, "b"),
                  "Guidance Start": float(unit.guidance_start), "Guidance End": float(unit.guidance_end),
                  "Pixel Perfect": bool(unit.pixel_perfect), "Control Mode": unit.mode}
        out[f"ControlNet {i}"] = ", ".join(f"{key}: {value}" for key, value in values.items())
    return out


def _threshold(unit: ControlUnit, which: str) -> float | int:
    """A threshold as the extension writes it: the given value; left out, the slider's default as the extension
    declares it (Canny's 100, not 100.0). A module without that slider has the extension's hidden one (0 to 1,
    default 0.5), which keeps a given value inside its range and writes 0.5 otherwise."""
    value = getattr(unit, f"threshold_{which}")
    slider = getattr(detectors.find_module(unit.module), f"threshold_{which}", None)
    if slider is None:
        return float(value) if value is not None and 0 <= value <= 1 else 0.5
    return slider.value if value is None else float(value)
