"""The judge reads ground-truth renders correctly (>= 99%) and scores stated attributes only."""

import numpy as np
from PIL import Image

from plainsd.eval.judge import detect, judge
from plainsd.train.data import ALL_SHAPES, Obj, Scene, ShapesDataset, render


def test_accuracy_on_ground_truth_renders():
    ds = ShapesDataset(seed=2024, shapes=ALL_SHAPES)  # held-out star included
    right = total = 0
    for i in range(1000):
        image, _, scene = ds[i]
        bg, found = detect(image)
        want = sorted((o.position, o.shape, o.colour, o.size) for o in scene.objects)
        got = sorted((d.position, d.shape, d.colour, d.size) for d in found)
        right += want == got and bg == scene.background
        total += 1
    assert right / total >= 0.99, right / total


def test_judge_scores_only_what_was_asked():
    scene = Scene([Obj("circle", "red", "large", "left")], "blue", stated=[{"shape", "colour"}])
    image = render(Scene([Obj("circle", "red", "small", "right")], "blue"))
    assert judge(image, scene) == [{"shape": True, "colour": True}]
    wrong = render(Scene([Obj("square", "green", "small", "right")], "blue"))
    assert judge(wrong, scene) == [{"shape": False, "colour": False}]
    empty = Image.new("RGB", (64, 64), (40, 80, 220))
    assert judge(empty, scene) == [{"shape": False, "colour": False}]


def test_two_objects_matched_by_position():
    objs = [Obj("square", "red", "small", "left"), Obj("triangle", "yellow", "large", "right")]
    full = {"shape", "colour", "size", "position"}
    scene = Scene(objs, "gray", stated=[full, full])
    assert judge(render(scene), scene) == [dict.fromkeys(sorted(full), True)] * 2


def test_noise_is_not_an_object():
    rng = np.random.default_rng(0)
    clean = np.asarray(render(Scene([Obj("circle", "red", "large", "centre")], "gray"))).astype(np.int16)
    noisy = np.clip(clean + rng.integers(-15, 15, (64, 64, 3)), 0, 255).astype(np.uint8)
    _, found = detect(Image.fromarray(noisy))
    assert len(found) == 1 and found[0].shape == "circle" and found[0].colour == "red"
