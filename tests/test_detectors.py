import json

import numpy as np
import pytest
from PIL import Image

from plainsd import detectors
from plainsd.train.data import Obj, Scene, render

cv2 = pytest.importorskip("cv2")


def _square(size=64, colour="red", background="blue"):
    """The shapes world's large square in the centre: its sides at 17.6 and 46.4 of 64."""
    return render(Scene([Obj("square", colour, "large", "centre")], background), size=size)


def _array(image):
    return np.asarray(image).astype(np.int32)


# --- detect ------------------------------------------------------------------------------------------------

def test_canny_marks_the_square_border_and_nothing_else():
    hint = _array(detectors.detect("canny", _square(), resolution=64))
    assert hint.shape == (64, 64, 3) and set(np.unique(hint)) == {0, 255}
    ys, xs = np.nonzero(hint[..., 0])
    near_side = np.minimum(np.minimum(abs(xs - 17.6), abs(xs - 46.4)), np.minimum(abs(ys - 17.6), abs(ys - 46.4)))
    inside_box = (xs > 15) & (xs < 49) & (ys > 15) & (ys < 49)
    assert (near_side < 2).all() and inside_box.all()
    for side in (slice(16, 20), slice(45, 49)):  # each of the four sides has its edge
        assert hint[side, 20:44, 0].any(axis=0).all() and hint[20:44, side, 0].any(axis=1).all()


def test_canny_equals_opencv_on_the_resized_picture():
    picture = _square()
    upscaled = cv2.resize(np.asarray(picture), (128, 128), interpolation=cv2.INTER_CUBIC)
    expected = cv2.Canny(upscaled, 100, 200)
    hint = _array(detectors.detect("canny", picture, resolution=128))
    assert hint.shape == (128, 128, 3)
    assert (hint == expected[..., None]).all()
    # not a multiple of 64: the extension pads by repeating the edge to 128, detects, and cuts back to 100
    shrunk = cv2.resize(np.asarray(picture.resize((200, 200))), (100, 100), interpolation=cv2.INTER_AREA)
    padded = np.pad(shrunk, [[0, 28], [0, 28], [0, 0]], mode="edge")
    expected = cv2.Canny(padded, 50, 150)[:100, :100]
    hint = _array(detectors.detect("canny", picture.resize((200, 200)), resolution=100, threshold_a=50, threshold_b=150))
    assert (hint == expected[..., None]).all()


def test_canny_thresholds_drop_a_faint_edge():
    faint = Image.new("RGB", (64, 64), (128, 128, 128))
    faint.paste((140, 140, 140), (16, 16, 48, 48))  # a step of 12: Sobel gives about 48
    assert _array(detectors.detect("canny", faint, 64, 20, 40)).max() == 255
    assert _array(detectors.detect("canny", faint, 64)).max() == 0  # the defaults 100 / 200


def test_invert_and_threshold_exact_pixels():
    picture = Image.new("RGB", (64, 64))
    for i, colour in enumerate([(200, 200, 200), (200, 100, 200), (128, 128, 128), (127, 255, 255)]):
        picture.paste(colour, (16 * i, 0, 16 * i + 16, 64))
    inverted = _array(detectors.detect("invert", picture))
    assert (inverted == 255 - _array(picture)).all()
    assert (_array(detectors.detect("invert (from white bg & black line)", picture)) == inverted).all()  # its label
    binary = _array(detectors.detect("threshold", picture, resolution=64))
    assert [binary[32, 16 * i + 8, 0] for i in range(4)] == [255, 0, 255, 0]  # every channel above 127?
    assert [_array(detectors.detect("threshold", picture, 64, 150))[32, 16 * i + 8, 0] for i in range(4)] == [255, 0, 0, 0]


def test_scribble_xdog_finds_a_thin_dark_line():
    # A one-pixel black line on white. Worked by hand with OpenCV's kernels: at the line the fine blur
    # (sigma 0.5) is 54 and the wide one (sigma 5) 235, a darkness of 180 > 32 / 2; one pixel beside it
    # 228 and 235 (darkness 7: under 16, over 1); two pixels beside it the fine blur is the brighter. (Float
    # noise in flat areas rounds to a darkness of 1, as in the extension: a threshold of 1 would show it.)
    picture = Image.new("RGB", (128, 128), (255, 255, 255))
    picture.paste((0, 0, 0), (64, 0, 65, 128))
    hint = _array(detectors.detect("scribble_xdog", picture, resolution=128))
    assert (np.nonzero(hint[50, :, 0])[0] == [64]).all() and (hint[:, 64] == 255).all()
    wide = _array(detectors.detect("scribble_xdog", picture, resolution=128, threshold_a=2))
    assert list(np.nonzero(wide[50, :, 0])[0]) == [63, 64, 65]


def test_resolution_sets_the_hint_size_and_none_keeps_the_picture():
    picture = Image.new("RGB", (300, 200), (255, 255, 255))
    assert detectors.detect("canny", picture, resolution=512).size == (768, 512)
    assert detectors.detect("threshold", picture, resolution=100).size == (150, 100)
    assert detectors.detect("none", picture, resolution=64).size == (300, 200)
    assert (_array(detectors.detect("none", picture.convert("L"))) == 255).all()  # greyscale in, RGB out


def test_refused_and_unknown_modules_and_bad_thresholds():
    picture = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="^the depth_midas preprocessor needs its network's weights, which plainsd "
                                         "does not include; give an already-processed hint with module none$"):
        detectors.detect("depth_midas", picture)
    with pytest.raises(ValueError, match="the openpose preprocessor needs its network's weights"):
        detectors.detect("openpose", picture)
    with pytest.raises(ValueError, match="unknown ControlNet preprocessor 'cany'; plainsd runs: none, canny, invert"):
        detectors.detect("cany", picture)
    with pytest.raises(ValueError, match=r"canny preprocessor's threshold_b \(High Threshold\) must be from 1 to 255, "
                                         "got 300"):
        detectors.detect("canny", picture, threshold_b=300)
    with pytest.raises(ValueError, match="scribble_xdog preprocessor's threshold_a"):
        detectors.detect("scribble_xdog", picture, threshold_a=0.5)
    assert detectors.detect("none", picture, threshold_a=64, threshold_b=64).size == (64, 64)  # has no thresholds


def test_the_module_list_is_honest():
    runnable = [m.name for m in detectors.MODULES.values() if not m.needs_weights]
    assert runnable[:5] == ["none", "canny", "invert", "threshold", "scribble_xdog"]
    picture = Image.new("RGB", (64, 64), (90, 90, 90))
    for name in runnable:  # every module offered as runnable runs
        assert detectors.detect(name, picture, resolution=64).mode == "RGB"
    canny = detectors.MODULES["canny"]
    assert (canny.threshold_a.value, canny.threshold_b.value, canny.resolution.value) == (100, 200, 512)
    assert detectors.find_module("depth_midas").name == "depth"


# --- fit ---------------------------------------------------------------------------------------------------

def _stripes(colours, width=32, height=64):
    picture = Image.new("RGB", (width * len(colours), height))
    for i, colour in enumerate(colours):
        picture.paste(colour, (width * i, 0, width * (i + 1), height))
    return picture


def test_fit_crop_and_resize_cuts_the_middle_out():
    a, b, c, d = (200, 50, 50), (50, 200, 50), (50, 50, 200), (120, 120, 120)
    out = _array(detectors.fit(_stripes([a, b, c, d]), 64, 64, "Crop and Resize"))  # 128x64 covers at scale 1
    assert out.shape == (64, 64, 3)
    assert (out[:, :32] == b).all() and (out[:, 32:] == c).all()
    out = _array(detectors.fit(_stripes([a, b, c, d]), 64, 128, 1))  # scale 2: the middle 64 of 256 columns
    assert out.shape == (128, 64, 3) and (out[:, :32] == b).all() and (out[:, 32:] == c).all()


def test_fit_resize_and_fill_pads_with_the_border_colour():
    background, square = (10, 20, 30), (200, 100, 50)
    picture = Image.new("RGB", (128, 64), background)
    picture.paste(square, (48, 16, 80, 48))
    out = _array(detectors.fit(picture, 64, 64, "Resize and Fill"))  # 64x32 in the middle rows 16..48
    assert out.shape == (64, 64, 3)
    assert (out[:24] == background).all() and (out[40:] == background).all()
    assert (out[24:40, 24:40] == square).all() and (out[24:40, :24] == background).all()
    assert (_array(detectors.fit(picture, 64, 64, "Envelope (Outer Fit)")) == out).all()  # the older name


def test_fit_just_resize_stretches():
    a, b = (200, 50, 50), (50, 200, 50)
    out = _array(detectors.fit(_stripes([a, b]), 32, 96, "Just Resize"))  # 64x64 -> 32 wide, 96 high
    assert out.shape == (96, 32, 3)
    assert (out[:, :15] == a).all() and (out[:, 17:] == b).all()


def test_fit_keeps_one_pixel_edges_thin_and_binary():
    edges = detectors.detect("canny", _square(), resolution=64)
    out = _array(detectors.fit(edges, 128, 128, "Just Resize"))
    assert set(np.unique(out)) == {0, 255}
    # bicubic alone would smear each edge over 3-4 pixels; the thinning leaves lines about one pixel wide
    assert np.count_nonzero(out[..., 0]) < 2.5 * np.count_nonzero(_array(edges)[..., 0])
    ys, xs = np.nonzero(out[..., 0])
    assert ((xs > 31) & (xs < 97) & (ys > 31) & (ys < 97)).all()


def test_resize_mode_names():
    assert [detectors.resize_mode_name(v) for v in (0, 1, 2, 3)] == [
        "Just Resize", "Crop and Resize", "Resize and Fill", "Just Resize"]
    assert detectors.resize_mode_name("Inner Fit (Scale to Fit)") == "Crop and Resize"
    assert detectors.resize_mode_name("Outer Fit (Shrink to Fit)") == "Resize and Fill"
    for bad in ("crop", 4, True):
        with pytest.raises(ValueError, match="unknown ControlNet resize mode"):
            detectors.resize_mode_name(bad)


def test_pixel_perfect_resolution_by_hand():
    # the extension: round(scale * short side), scale = max (Crop and Resize) or min (Resize and Fill) of
    # target height / height and target width / width
    wide = Image.new("RGB", (768, 512))
    assert detectors.pixel_perfect_resolution(wide, 512, 512, "Crop and Resize") == 512    # max(1, 2/3) * 512
    assert detectors.pixel_perfect_resolution(wide, 512, 512, "Resize and Fill") == 341    # 2/3 * 512 = 341.3
    small = Image.new("RGB", (300, 200))
    assert detectors.pixel_perfect_resolution(small, 640, 512, "Crop and Resize") == 512   # 2.56 * 200
    assert detectors.pixel_perfect_resolution(small, 640, 512, 2) == 427                   # 2.133 * 200 = 426.7
    assert detectors.pixel_perfect_resolution(small, 640, 512, "Just Resize") == 512


# --- openpose_json -----------------------------------------------------------------------------------------

def _person(**points):
    """A pose_keypoints_2d of 18 COCO keypoints, unseen except the given {index: (x, y)}."""
    numbers = [0.0] * 54
    for i, (x, y) in points.items():
        numbers[3 * int(i[1:]):3 * int(i[1:]) + 3] = [x, y, 1.0]
    return numbers


def test_openpose_limb_between_two_keypoints_in_its_colour():
    # keypoints 1 (neck) and 2 (right shoulder): the first limb, red at 60%, and the joints' own colours
    pose = {"canvas_width": 64, "canvas_height": 64, "people": [{"pose_keypoints_2d": _person(k1=(10, 32), k2=(50, 32))}]}
    hint = _array(detectors.openpose_json(pose))
    assert hint.shape == (64, 64, 3)
    assert (hint[28:37, 27:34] == (153, 0, 0)).all()                  # the ellipse: 4 pixels either side
    assert (hint[32, 15:46] == (153, 0, 0)).all() and (hint[27, 30] == 0).all() and (hint[37, 30] == 0).all()
    assert (hint[32, 10] == (255, 85, 0)).all() and (hint[32, 50] == (255, 170, 0)).all()
    assert (hint[:22] == 0).all() and (hint[43:] == 0).all()           # nothing else
    assert (hint[32, 6:15] == (255, 85, 0)).all() and (hint[32, 4] == 0).all()  # joint radius 4
    # normalised coordinates draw the same; pixel ones follow a canvas rescaled to 128
    same = {"canvas_width": 64, "canvas_height": 64,
            "people": [{"pose_keypoints_2d": _person(k1=(10 / 64, 0.5), k2=(50 / 64, 0.5))}]}
    assert (_array(detectors.openpose_json(json.dumps(same))) == hint).all()
    big = _array(detectors.openpose_json(pose, 128, 128))
    assert (big[64, 20] == (255, 85, 0)).all() and (big[64, 100] == (255, 170, 0)).all() and (big[64, 60] == (153, 0, 0)).all()


def test_openpose_unseen_keypoints_are_not_drawn():
    numbers = _person(k1=(10, 32), k2=(50, 32))
    numbers[5] = 0.0  # keypoint 1 unseen: no joint and no limb
    hint = _array(detectors.openpose_json({"canvas_width": 64, "canvas_height": 64,
                                           "people": [{"pose_keypoints_2d": numbers}]}))
    assert (hint[32, 10] == 0).all() and (hint[32, 30] == 0).all() and (hint[32, 50] == (255, 170, 0)).all()
    numbers[3:6] = [-1, -1, 1.0]  # the (-1, -1) of DWPose's files is unseen too
    assert (_array(detectors.openpose_json({"canvas_width": 64, "canvas_height": 64,
                                            "people": [{"pose_keypoints_2d": numbers}]}))[32, :40] == 0).all()


def test_openpose_hands_and_face():
    hand = [0.0] * 63
    hand[0:3], hand[3:6] = [20, 20, 1], [40, 20, 1]  # wrist and thumb base: the first hand edge, hue 0 = red
    face = [0.0] * 210
    face[0:3] = [30, 50, 1]
    pose = {"canvas_width": 64, "canvas_height": 64, "people": [
        {"pose_keypoints_2d": [0.0] * 54, "hand_left_keypoints_2d": hand, "face_keypoints_2d": face}]}
    hint = _array(detectors.openpose_json(pose))
    assert (hint[20, 20] == (0, 0, 255)).all() and (hint[20, 40] == (0, 0, 255)).all()  # blue dots, radius 4
    assert (hint[20, 30] == (255, 0, 0)).all() and (hint[24, 30] == 0).all()            # the line, 2 wide
    assert (hint[50, 30] == 255).all() and (hint[50, 27] == 255).all() and (hint[50, 26] == 0).all()  # radius 3


def test_openpose_bad_json_gets_a_sentence():
    with pytest.raises(ValueError, match="no canvas_width / canvas_height; give the picture's width and height"):
        detectors.openpose_json({"people": []})
    with pytest.raises(ValueError, match=r"people\[0\].pose_keypoints_2d must hold 54 or 75 numbers"):
        detectors.openpose_json({"canvas_width": 8, "canvas_height": 8, "people": [{"pose_keypoints_2d": [1, 2, 1]}]})
    with pytest.raises(ValueError, match="not valid JSON"):
        detectors.openpose_json("{people")
    assert _array(detectors.openpose_json({"people": []}, 16, 8)).shape == (8, 16, 3)  # nobody: black
