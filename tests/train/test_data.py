"""The shapes world: deterministic, varied captions, the held-out star, and users' folders."""

import json

import numpy as np
import pytest
from PIL import Image

from plainsd.train.data import ALL_SHAPES, COLOURS, SHAPES, FolderDataset, ShapesDataset


def test_deterministic_by_seed():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    for i in (0, 17, 999):
        assert a[i][1] == b[i][1] and np.array_equal(np.asarray(a[i][0]), np.asarray(b[i][0]))
    assert ShapesDataset(seed=4)[0][1] != a[0][1] or ShapesDataset(seed=4)[1][1] != a[1][1]


def test_coverage_and_partial_captions():
    ds = ShapesDataset(seed=0)
    scenes = [ds.scene(i) for i in range(2000)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES) and "star" not in {o.shape for o in objects}
    assert {o.colour for o in objects} == set(COLOURS) and len(COLOURS) == 8
    assert {o.size for o in objects} == {"small", "large"}
    assert {o.position for o in objects} == {"left", "right", "top", "bottom", "centre"}
    assert 0.15 < np.mean([len(s.objects) == 2 for s in scenes]) < 0.35
    assert any("colour" not in st for s in scenes for st in s.stated)  # attributes are sometimes left out
    assert any("position" not in st for s in scenes for st in s.stated)
    assert len({s.caption for s in scenes}) > 1500
    for s in scenes[:300]:  # what the caption states is in it
        for o, st in zip(s.objects, s.stated):
            assert o.shape in s.caption
            if "colour" in st:
                assert o.colour in s.caption


def test_the_heart_and_the_star_are_known_but_held_out():
    for shape in ("heart", "star"):
        assert shape in ALL_SHAPES and shape not in SHAPES
        ds = ShapesDataset(seed=0, shapes=[shape])
        assert all(o.shape == shape for i in range(20) for o in ds.scene(i).objects)


def test_sizes_can_be_restricted_and_the_default_data_is_unchanged():
    large = ShapesDataset(seed=3, shapes=["heart"], sizes=["large"], two_objects=0.0)
    assert {large.scene(i).objects[0].size for i in range(30)} == {"large"}
    assert ShapesDataset(seed=3).scene(7) == ShapesDataset(seed=3, sizes=("small", "large")).scene(7)
    with pytest.raises(ValueError, match="unknown shape or size 'huge'"):
        ShapesDataset(sizes=["huge"])
    with pytest.raises(ValueError, match="unknown shape or size 'blob'"):
        ShapesDataset(shapes=["blob"])


def test_colours_positions_and_backgrounds_can_be_restricted():
    one = ShapesDataset(seed=3, colours=["orange"], positions=["top"], backgrounds=["black"], two_objects=0.0)
    assert {(s.objects[0].colour, s.objects[0].position, s.background) for s in map(one.scene, range(30))} == \
        {("orange", "top", "black")}
    two = ShapesDataset(seed=3, colours=["red", "blue", "green"], positions=["left", "right"], two_objects=1.0)
    scenes = [two.scene(i) for i in range(30)]
    assert all({o.position for o in s.objects} == {"left", "right"} for s in scenes)
    assert {o.colour for s in scenes for o in s.objects} == {"red", "blue", "green"}
    assert all(s.background not in {o.colour for o in s.objects} for s in scenes)
    assert ShapesDataset(seed=3).scene(7) == ShapesDataset(seed=3, colours=tuple(COLOURS)).scene(7)
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        ShapesDataset(colours=["pink"])
    with pytest.raises(ValueError, match="unknown position 'top right'; known: left, right, top, bottom, centre"):
        ShapesDataset(positions=["top right"])
    with pytest.raises(ValueError, match="need a background of another colour"):
        ShapesDataset(colours=["black"], backgrounds=["black"], two_objects=0.0)
    with pytest.raises(ValueError, match="both positions of a pair"):
        ShapesDataset(positions=["top"])  # two-object scenes by default


def test_folder_with_txt_captions(tmp_path):
    Image.new("RGB", (80, 40), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "b.jpg")
    ds = FolderDataset(tmp_path, size=32)
    assert len(ds) == 2 and ds[0][1] == "a red thing" and ds[1][1] == "" and ds[0][0].size == (32, 32)


def test_folder_with_metadata_jsonl(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "red"}) + "\n")
    assert FolderDataset(tmp_path)[0][1] == "red"
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="not there: .*missing.png"):
        FolderDataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        FolderDataset(tmp_path)


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        FolderDataset(tmp_path)
    with pytest.raises(ValueError, match="no such data folder"):
        FolderDataset(tmp_path / "nope")
