"""ControlNet preprocessors ("modules" in A1111's ControlNet extension): a picture in, the hint image out.

Hints are RGB images, white (or coloured) lines and areas on black, as the ControlNet models were trained on.
The names, sliders and steps follow the extension (Mikubill/sd-webui-controlnet): `detect` runs a module at
the processor resolution, `fit` brings the hint to the generation size with one of its three resize modes,
and `pixel_perfect_resolution` picks the processor resolution that needs no resize afterwards.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ValueError("ControlNet preprocessors need OpenCV: pip install 'plainsd[controlnet]'") from None
    return cv2


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """OpenCV's Canny edge detector on the RGB picture with the extension's thresholds: white edges on black."""
    edges = _cv2().Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(edges).convert("RGB")


# --- the modules -------------------------------------------------------------------------------------------

def _resize_with_pad(rgb: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The extension's resize_image_with_pad: short side to `resolution`, then edge-padded to multiples of 64.

    Returns the padded picture and the (height, width) to cut the module's output back to.
    """
    h, w = rgb.shape[:2]
    k = resolution / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    cv2 = _cv2()
    resized = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    padded = np.pad(resized, [[0, -th % 64], [0, -tw % 64], [0, 0]], mode="edge")
    return np.ascontiguousarray(padded), (th, tw)


def _padded(run: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """A module that works on the resized, padded picture; its output is cut back to the unpadded size."""
    def wrapped(rgb: np.ndarray, resolution: int, a, b) -> np.ndarray:
        padded, (h, w) = _resize_with_pad(rgb, resolution)
        return run(padded, a, b)[:h, :w]
    wrapped.__doc__ = run.__doc__
    return wrapped


def _none(rgb, resolution, a, b):
    """The picture itself: an already-processed hint."""
    return rgb


def _invert(rgb, resolution, a, b):
    """White lines on black from black lines on white (a drawing or a line-art scan)."""
    return 255 - rgb


@_padded
def _canny(rgb, low, high):
    """OpenCV's Canny on the RGB picture (the strongest channel's gradient), white edges on black."""
    return _cv2().Canny(rgb, int(low), int(high))


@_padded
def _threshold(rgb, level, b):
    """White where every channel is brighter than the threshold, black elsewhere."""
    return np.where(rgb.min(axis=2) > level, 255, 0).astype(np.uint8)


@_padded
def _scribble_xdog(rgb, level, b):
    """XDoG scribble: where a fine blur (sigma 0.5) is darker than a wide one (sigma 5) by more than level / 2.

    The extension computes 2 * darkness in uint8 and so wraps at 128; we compare the true value.
    """
    cv2 = _cv2()
    x = rgb.astype(np.float32)
    darkness = (cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5)).min(axis=2)
    darkness = 255 - (255 - darkness).clip(0, 255).astype(np.uint8).astype(np.int32)  # as the extension rounds
    return np.where(2 * darkness > level, 255, 0).astype(np.uint8)


@_padded
def _lineart_standard(rgb, a, b):
    """Lines darker than their surroundings (a sigma-6 blur), scaled so that the median line is grey 127."""
    x = rgb.astype(np.float32)
    intensity = (_cv2().GaussianBlur(x, (0, 0), 6.0) - x).min(axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(lines)) if lines.size else 0.0)
    return (intensity * 127).clip(0, 255).astype(np.uint8)


@_padded
def _blur_gaussian(rgb, sigma, b):
    """A Gaussian blur of the picture (for the tile models)."""
    return _cv2().GaussianBlur(rgb, (0, 0), float(sigma))


def _tile_resample(rgb, resolution, rate, b):
    """The picture shrunk by the down-sampling rate (for the tile models); rates below 1.1 keep it."""
    if rate < 1.1:
        return rgb
    h, w = rgb.shape[:2]
    cv2 = _cv2()
    return cv2.resize(rgb, (int(w / rate), int(h / rate)), interpolation=cv2.INTER_AREA)


# --- the list ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slider:
    """One of a module's settings, as the extension's UI shows it (its API's module_detail sliders)."""
    label: str
    minimum: float
    maximum: float
    value: float                  # the default
    step: float = 1.0


RESOLUTION = Slider("Resolution", 64, 2048, 512, 8)


@dataclass(frozen=True)
class Module:
    """A preprocessor: its names, its settings, and how it runs (None: listed but not runnable here)."""
    name: str                            # the extension's module name (its API's module_list)
    label: str                           # the name its UI shows (module_list with alias_names)
    run: Callable | None = None          # (rgb uint8 HxWx3, resolution, threshold_a, threshold_b) -> uint8 map
    resolution: Slider | None = RESOLUTION  # None: the module ignores the processor resolution
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None

    @property
    def needs_weights(self) -> bool:
        """True for modules that run a network (depth, pose, soft edges, ...), whose weights plainsd lacks."""
        return self.run is None


def _module(name, run=None, label=None, resolution=RESOLUTION, a=None, b=None) -> tuple[str, Module]:
    return name, Module(name, label or name, run, resolution, a, b)


MODULES: dict[str, Module] = dict([
    _module("none", _none, resolution=None),
    _module("canny", _canny, a=Slider("Low Threshold", 1, 255, 100), b=Slider("High Threshold", 1, 255, 200)),
    _module("invert", _invert, "invert (from white bg & black line)", resolution=None),
    _module("threshold", _threshold, a=Slider("Binarization Threshold", 0, 255, 127)),
    _module("scribble_xdog", _scribble_xdog, a=Slider("XDoG Threshold", 1, 64, 32, 0.01)),
    _module("lineart_standard", _lineart_standard, "lineart_standard (from white bg & black line)"),
    _module("blur_gaussian", _blur_gaussian, a=Slider("Sigma", 0.01, 64.0, 9.0, 0.01)),
    _module("tile_resample", _tile_resample, resolution=None,
            a=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01)),
    # Modules that run a network: listed under the extension's names so that a request naming one gets a
    # clear answer, refused by detect (their hints can be made elsewhere and given with module "none").
    _module("depth", label="depth_midas"),
    _module("depth_leres", a=Slider("Remove Near %", 0, 100, 0, 0.1), b=Slider("Remove Background %", 0, 100, 0, 0.1)),
    _module("depth_leres++", a=Slider("Remove Near %", 0, 100, 0, 0.1),
            b=Slider("Remove Background %", 0, 100, 0, 0.1)),
    _module("depth_zoe", resolution=None),
    _module("depth_anything", resolution=None),
    _module("depth_anything_v2", resolution=None),
    _module("normal_map", label="normal_midas", a=Slider("Normal Background Threshold", 0.0, 1.0, 0.4, 0.01)),
    _module("normal_bae", resolution=None),
    _module("openpose"),
    _module("openpose_face", resolution=None),
    _module("openpose_faceonly", resolution=None),
    _module("openpose_full"),
    _module("openpose_hand", resolution=None),
    _module("dw_openpose_full"),
    _module("animal_openpose"),
    _module("densepose", label="densepose (pruple bg & purple torso)"),
    _module("densepose_parula", label="densepose_parula (black bg & blue torso)"),
    _module("mediapipe_face", a=Slider("Max Faces", 1, 10, 1), b=Slider("Min Face Confidence", 0.01, 1.0, 0.5, 0.01)),
    _module("hed", label="softedge_hed"),
    _module("hed_safe", label="softedge_hedsafe"),
    _module("pidinet", label="softedge_pidinet", resolution=None),
    _module("pidinet_safe", label="softedge_pidisafe", resolution=None),
    _module("te_hed", label="softedge_teed"),
    _module("scribble_hed"),
    _module("pidinet_scribble", label="scribble_pidinet", resolution=None),
    _module("pidinet_sketch", label="t2ia_sketch_pidi", resolution=None),
    _module("lineart", label="lineart_realistic", resolution=None),
    _module("lineart_coarse", resolution=None),
    _module("lineart_anime", resolution=None),
    _module("lineart_anime_denoise", resolution=None),
    _module("mlsd", a=Slider("MLSD Value Threshold", 0.01, 2.0, 0.1, 0.01),
            b=Slider("MLSD Distance Threshold", 0.01, 20.0, 0.1, 0.01)),
    _module("segmentation", label="seg_ufade20k"),
    _module("oneformer_coco", label="seg_ofcoco", resolution=None),
    _module("oneformer_ade20k", label="seg_ofade20k", resolution=None),
    _module("anime_face_segment", label="seg_anime_face"),
])


def find_module(name: str) -> Module:
    """The module by its name or its UI label, as the extension accepts either."""
    if name in MODULES:
        return MODULES[name]
    for module in MODULES.values():
        if module.label == name:
            return module
    runnable = ", ".join(m.name for m in MODULES.values() if not m.needs_weights)
    raise ValueError(f"unknown ControlNet preprocessor {name!r}; plainsd runs: {runnable}")


def _setting(module: str, slider: Slider | None, value: float | None, what: str) -> float | None:
    """The slider's value: its default when not given, refused outside its range."""
    if slider is None:
        return None  # the module has no such setting; the extension's API sends one for every module anyway
    if value is None:
        return slider.value
    if not slider.minimum <= value <= slider.maximum:
        raise ValueError(f"the {module} preprocessor's {what} ({slider.label}) must be from {slider.minimum:g} "
                         f"to {slider.maximum:g}, got {value:g}")
    return value


def check(module: str, threshold_a: float | None = None, threshold_b: float | None = None) -> Module:
    """The module, if it exists, runs here, and the thresholds are in its ranges; else one ValueError sentence."""
    m = find_module(module)
    if m.needs_weights:
        raise ValueError(f"the {module} preprocessor needs its network's weights, which plainsd does not include; "
                         "give an already-processed hint with module none")
    _setting(module, m.threshold_a, threshold_a, "threshold_a")
    _setting(module, m.threshold_b, threshold_b, "threshold_b")
    return m


def detect(module: str, image: Image.Image, resolution: int = 512, threshold_a: float | None = None,
           threshold_b: float | None = None) -> Image.Image:
    """The hint the module makes of the picture: RGB, about `resolution` pixels on its short side.

    Modules without a resolution (none, invert, tile_resample) keep the picture's size. Thresholds a module
    does not have are ignored, as the extension does; None means the module's default.
    """
    m = check(module, threshold_a, threshold_b)
    if not 1 <= resolution <= 8192:
        raise ValueError(f"the preprocessor resolution must be from 1 to 8192 pixels (usually 64 to 2048), "
                         f"got {resolution}")
    a = _setting(module, m.threshold_a, threshold_a, "threshold_a")
    b = _setting(module, m.threshold_b, threshold_b, "threshold_b")
    out = m.run(np.asarray(image.convert("RGB")), int(resolution), a, b)
    return Image.fromarray(np.ascontiguousarray(out)).convert("RGB")


# --- the hint's geometry -----------------------------------------------------------------------------------

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
_RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Scale to Fit (Inner Fit)": "Crop and Resize",
                   "Outer Fit (Shrink to Fit)": "Resize and Fill", "Envelope (Outer Fit)": "Resize and Fill"}


def resize_mode_name(value: str | int) -> str:
    """The extension's resize mode by name, older name, or number (0, 1, 2; 3 = A1111's latent Just Resize)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
        return RESIZE_MODES[0 if value == 3 else value]
    if isinstance(value, str) and _RESIZE_ALIASES.get(value, value) in RESIZE_MODES:
        return _RESIZE_ALIASES.get(value, value)
    raise ValueError(f"unknown ControlNet resize mode {value!r}; allowed: {', '.join(RESIZE_MODES)} (or 0, 1, 2)")


def pixel_perfect_resolution(image: Image.Image, width: int, height: int, resize_mode: str | int) -> int:
    """The processor resolution whose hint needs no resizing to fill (or fit in) width x height.

    The extension's formula: the scale that the resize mode applies, times the picture's short side.
    """
    k_h, k_w = height / image.height, width / image.width
    k = min(k_h, k_w) if resize_mode_name(resize_mode) == "Resize and Fill" else max(k_h, k_w)
    return int(np.round(k * min(image.width, image.height)))


def fit(image: Image.Image, width: int, height: int, resize_mode: str | int = "Crop and Resize") -> Image.Image:
    """The hint at the generation size, by the extension's resize modes.

    Just Resize stretches; Crop and Resize scales to cover and cuts the middle out; Resize and Fill scales to
    fit inside and fills the rest with the median colour of the hint's border. Resizing keeps binary hints
    binary and one-pixel edges one pixel wide (see _hint_resize).
    """
    mode = resize_mode_name(resize_mode)
    hint = np.asarray(image.convert("RGB"))
    if mode == "Just Resize":
        return Image.fromarray(_hint_resize(hint, width, height))
    h0, w0 = hint.shape[:2]
    k_h, k_w = height / h0, width / w0
    k = min(k_h, k_w) if mode == "Resize and Fill" else max(k_h, k_w)
    scaled = _hint_resize(hint, int(np.round(w0 * k)), int(np.round(h0 * k)))
    nh, nw = scaled.shape[:2]
    if mode == "Crop and Resize":
        top, left = max(0, (nh - height) // 2), max(0, (nw - width) // 2)
        return Image.fromarray(np.ascontiguousarray(scaled[top:top + height, left:left + width]))
    border = np.concatenate([hint[0], hint[-1], hint[:, 0], hint[:, -1]])
    out = np.empty((height, width, 3), np.uint8)
    out[:] = np.median(border, axis=0).astype(np.uint8)
    top, left = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
    out[top:top + nh, left:left + nw] = scaled[:height, :width]
    return Image.fromarray(out)


def _hint_resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """The extension's high-quality hint resize (lvmin's): nearest for few-colour maps (segmentation), area
    shrinking and cubic growing otherwise; a black-and-white hint is thresholded back to two colours (Otsu),
    and one made of one-pixel edges is also thinned back to one pixel, so that edges stay crisp."""
    if x.shape[:2] == (height, width):
        return x
    cv2 = _cv2()
    packed = (x[..., 0].astype(np.uint32) << 16) | (x[..., 1].astype(np.uint32) << 8) | x[..., 2]
    colours = len(np.unique(packed))
    smaller, bigger = width * height < x.shape[0] * x.shape[1], width * height > x.shape[0] * x.shape[1]
    binary = colours == 2 and x.min() < 16 and x.max() > 240
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if smaller else cv2.INTER_CUBIC
    y = cv2.resize(x, (width, height), interpolation=interpolation)
    if not binary:
        return y
    square = np.ones((3, 3), np.uint8)
    opened = cv2.dilate(cv2.erode(x, square), square)
    one_pixel_edges = 2 * np.count_nonzero(opened < x) > np.count_nonzero(x > 127)
    y = y.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8)
    if one_pixel_edges:
        y = _nms(y)
    y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
    if one_pixel_edges:
        y = _thin(y, prune=bigger)
    return np.ascontiguousarray(np.stack([y] * 3, axis=2))


def _nms(x: np.ndarray) -> np.ndarray:
    """Keep the pixels that are the largest of their neighbours along a row, a column or a diagonal."""
    cv2 = _cv2()
    lines = [np.array(k, np.uint8) for k in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
                                              [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    y = np.zeros_like(x)
    for line in lines:
        np.putmask(y, cv2.dilate(x, line) == x, x)
    return y


def _rotations(*kernels) -> list[np.ndarray]:
    """Each 3x3 hit-or-miss kernel (1 = on, -1 = off, 0 = either) turned by 0, 90, 180 and 270 degrees."""
    return [np.rot90(np.array(k, np.int32), turn) for turn in range(4) for k in kernels]


_THIN = _rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
_PRUNE = _rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])


def _strip(x: np.ndarray, kernels: list[np.ndarray]) -> bool:
    """One pass: clear (in place) the pixels each kernel matches, kernel after kernel; True if any was."""
    cv2 = _cv2()
    changed = False
    for kernel in kernels:
        hits = cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel) > 127
        x[hits] = 0
        changed |= bool(hits.any())
    return changed


def _thin(x: np.ndarray, prune: bool) -> np.ndarray:
    """lvmin's edge thinning: strip edge pixels until lines are one pixel wide (at most 32 passes), then
    (when the hint was enlarged) cut the one-pixel spurs off line ends once."""
    x = x.copy()
    for _ in range(32):
        if not _strip(x, _THIN):
            break
    if prune:
        _strip(x, _PRUNE)
    return x


# --- OpenPose skeletons from keypoints ---------------------------------------------------------------------
# The drawing the openpose ControlNets were trained on (controlnet_aux's and the extension's open_pose/util.py):
# 17 limbs as ellipses in 60% of their colour, 18 joints as dots of radius 4, hands as 20 lines in rainbow
# colours with blue dots, faces as white dots of radius 3, on black.

_LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
          (2, 1), (1, 15), (15, 17), (1, 16), (16, 18))  # 1-based COCO-18 keypoints: neck-shoulders, arms, ...
_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
            (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
            (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
_HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
               (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
_BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)  # OpenPose's default BODY_25
_EPS = 0.01
Point = tuple[float, float] | None


def _keypoints(numbers, what: str, counts: tuple[int, ...] = ()) -> list[Point] | None:
    """[x, y, confidence] * n as points; None where the confidence is 0 or the point is (-1, -1)."""
    if not numbers:
        return None
    if len(numbers) % 3 or (counts and len(numbers) // 3 not in counts):
        allowed = " or ".join(str(3 * n) for n in counts) if counts else "a multiple of 3"
        raise ValueError(f"{what} must hold {allowed} numbers ([x, y, confidence] per keypoint), got {len(numbers)}")
    points = [(float(x), float(y)) if c > 0 and (x, y) != (-1, -1) else None
              for x, y, c in zip(numbers[::3], numbers[1::3], numbers[2::3])]
    return [points[i] for i in _BODY25_TO_COCO18] if len(points) == 25 else points


def _to_pixels(points: list[Point] | None, scale_x: float, scale_y: float, width: int,
               height: int) -> list[Point] | None:
    """Pixel positions: normalised points (all within 0..1, as the extension tells them apart) times the
    canvas, pixel points times the canvas's rescaling."""
    if not points:
        return points
    given = [p for p in points if p is not None]
    normalised = bool(given) and all(abs(x) <= 1 and abs(y) <= 1 for x, y in given)
    sx, sy = (width, height) if normalised else (scale_x, scale_y)
    return [None if p is None else (p[0] * sx, p[1] * sy) for p in points]


def _draw_body(canvas: np.ndarray, points: list[Point]) -> None:
    cv2 = _cv2()
    for (a, b), colour in zip(_LIMBS, _COLOURS):
        p, q = points[a - 1], points[b - 1]
        if p is None or q is None:
            continue
        length = math.hypot(p[0] - q[0], p[1] - q[1])
        angle = math.degrees(math.atan2(p[1] - q[1], p[0] - q[0]))
        centre = (int((p[0] + q[0]) / 2), int((p[1] + q[1]) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), 4), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in colour])
    for p, colour in zip(points, _COLOURS):
        if p is not None:
            cv2.circle(canvas, (int(p[0]), int(p[1])), 4, colour, thickness=-1)


def _draw_hand(canvas: np.ndarray, points: list[Point]) -> None:
    cv2 = _cv2()
    for i, (a, b) in enumerate(_HAND_EDGES):
        p, q = points[a], points[b]
        if p is None or q is None:
            continue
        (x1, y1), (x2, y2) = (int(p[0]), int(p[1])), (int(q[0]), int(q[1]))
        if min(x1, y1, x2, y2) > _EPS:
            colour = [c * 255 for c in colorsys.hsv_to_rgb(i / len(_HAND_EDGES), 1.0, 1.0)]
            cv2.line(canvas, (x1, y1), (x2, y2), colour, thickness=2)
    _draw_dots(canvas, points, 4, (0, 0, 255))


def _draw_dots(canvas: np.ndarray, points: list[Point], radius: int, colour) -> None:
    for p in points:
        if p is not None and int(p[0]) > _EPS and int(p[1]) > _EPS:
            _cv2().circle(canvas, (int(p[0]), int(p[1])), radius, colour, thickness=-1)


def openpose_json(data: dict | str, width: int | None = None, height: int | None = None) -> Image.Image:
    """The OpenPose skeleton hint of a pose JSON (OpenPose's output format, as the extension's pose editor writes).

    `people[]` with `pose_keypoints_2d` (18 COCO keypoints, or OpenPose's BODY_25), optional
    `hand_left_keypoints_2d` / `hand_right_keypoints_2d` (21) and `face_keypoints_2d` (70); coordinates in
    pixels of `canvas_width` x `canvas_height` or normalised to 0..1. The picture is width x height (default:
    the canvas); pixel coordinates are rescaled to it. Unlike the extension, which keeps only confidence 1,
    any confidence above 0 counts as seen, so that OpenPose's own files draw whole.
    """
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"the pose is not valid JSON: {e}") from None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # the extension's editor and detect route give a list of one pose per image
    if not isinstance(data, dict) or not isinstance(data.get("people", []), list):
        raise ValueError("the pose must be a JSON object with a list of people (OpenPose's output format)")
    if data.get("animals"):
        raise ValueError("plainsd draws people's poses only; the pose JSON has animals")
    canvas_w, canvas_h = data.get("canvas_width"), data.get("canvas_height")
    width, height = width or canvas_w, height or canvas_h
    if not width or not height:
        raise ValueError("the pose JSON has no canvas_width / canvas_height; give the picture's width and height")
    sx, sy = width / (canvas_w or width), height / (canvas_h or height)
    canvas = np.zeros((int(height), int(width), 3), np.uint8)
    for n, person in enumerate(data.get("people", [])):
        def part(key: str, counts: tuple[int, ...] = ()) -> list[Point] | None:
            points = _keypoints(person.get(key), f"people[{n}].{key}", counts)
            return _to_pixels(points, sx, sy, int(width), int(height))

        body = part("pose_keypoints_2d", (18, 25))
        if body:
            _draw_body(canvas, body)
        for key in ("hand_left_keypoints_2d", "hand_right_keypoints_2d"):
            hand = part(key, (21,))
            if hand:
                _draw_hand(canvas, hand)
        face = part("face_keypoints_2d")
        if face:
            _draw_dots(canvas, face, 3, (255, 255, 255))
    return Image.fromarray(canvas)
