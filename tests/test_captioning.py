"""Captioners and `plainsd caption`: the shipped captioner names what held-out renders show (the judge's
attributes), files are found and refused as they should be, and a folder's captions are written, skipped and
overwritten as kohya's .txt files or a Hugging Face metadata.jsonl."""

import json

import pytest
import torch
from PIL import Image

from plainsd.captioning import (DEFAULT_CAPTIONER, ShapesCaptioner, caption_folder, captioner_kind, load_captioner,
                                read_captioner, save_captioner)
from plainsd.cli import main
from plainsd.config import CaptionerConfig
from plainsd.eval.captions import caption_shares, judged_scene
from plainsd.eval.metrics import held_out_scenes
from plainsd.models.captioner import Captioner
from plainsd.train.captioner import WORDS, full_caption
from plainsd.train.data import ALL_SHAPES, render


@pytest.fixture(scope="module")
def shipped():
    return load_captioner()


def test_shipped_captioner_names_held_out_renders(shipped):
    """A small sample of the benchmark (benchmarks/captioner_quality.py): every attribute of every object, for
    single objects of all seven shapes and for pairs, checked against the scene and against what the judge reads."""
    scenes = held_out_scenes(40, 1, shapes=ALL_SHAPES) + held_out_scenes(20, 2)
    images = [render(s) for s in scenes]
    captions = shipped.caption(images)
    shares = caption_shares(captions, scenes)
    assert shares["all"] >= 0.9, shares
    judged = caption_shares(captions, [judged_scene(im) for im in images])
    assert judged["colour"] >= 0.9 and judged["shape"] >= 0.85 and judged["position"] >= 0.9, judged
    # and the very words: most captions are the full caption of the scene
    assert sum(c == full_caption(s) for c, s in zip(captions, scenes)) >= 0.8 * len(scenes)


def test_shipped_file_is_small_float16_and_loads_by_every_name(shipped, tmp_path):
    assert DEFAULT_CAPTIONER.stat().st_size < 8 * 2 ** 20
    net = read_captioner(DEFAULT_CAPTIONER, torch.float16)
    assert net.dtype == torch.float16 and net.config.words == WORDS
    image = render(held_out_scenes(1, 1)[0])
    assert load_captioner("plainsd").caption([image]) == shipped.caption([image])
    assert load_captioner(DEFAULT_CAPTIONER).caption([image]) == shipped.caption([image])
    # another size of picture is fitted to the network's
    assert shipped.caption([image.resize((256, 256), Image.NEAREST)]) == shipped.caption([image])


def _random_captioner(seed=0) -> Captioner:
    torch.manual_seed(seed)
    return Captioner(CaptionerConfig(words=WORDS, channels=(8, 8), width=16, layers=1, heads=2, max_length=8))


def test_a_trained_file_round_trips_and_wrong_names_are_refused(tmp_path):
    net = _random_captioner()
    path = save_captioner(net, tmp_path / "c.safetensors", torch.float32)
    assert captioner_kind(path) == "file"
    loaded = load_captioner(path)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert loaded.net.generate(x) == net.eval().generate(x)
    with pytest.raises(ValueError, match="unknown captioner 'nothing'.*plainsd.*BLIP"):
        load_captioner("nothing")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ValueError, match="unknown captioner"):
        load_captioner(tmp_path / "folder")
    (tmp_path / "bad.safetensors").write_bytes(b"0" * 100)
    from plainsd.weights import CheckpointError
    with pytest.raises(CheckpointError):
        load_captioner(tmp_path / "bad.safetensors")


def test_a_blip_folder_captions_through_the_cli(tmp_path):
    """`plainsd caption --captioner FOLDER` with a BLIP folder (made by transformers' save_pretrained) writes what
    transformers' generate writes for the same pictures."""
    pytest.importorskip("transformers")
    from tests.blip_reference import build_tiny_folder, pictures
    blip = tmp_path / "blip"
    model, processor = build_tiny_folder(blip)
    assert captioner_kind(blip) == "blip"
    images = tmp_path / "images"
    images.mkdir()
    for i, picture in enumerate(pictures(2)):
        picture.save(images / f"{i}.png")
    assert main(["caption", str(images), "--captioner", str(blip), "--precision", "fp32", "--quiet"]) == 0
    inputs = processor(images=pictures(2), return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_length=30, min_length=5, num_beams=1)
    want = [processor.decode(row, skip_special_tokens=True).strip() for row in ids]
    got = [(images / f"{i}.txt").read_text().strip() for i in range(2)]
    assert got == want and all(got)


@pytest.mark.parametrize("native", [True, False])
def test_the_captioners_precision(tmp_path, monkeypatch, native):
    """auto: a BLIP model in bf16 exactly where the CPU has native bf16, the shapes world's captioner in float32;
    bf16 and fp32 as asked; anything else refused."""
    pytest.importorskip("transformers")
    from plainsd.runtime import precision
    from tests.blip_reference import build_tiny_folder
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    blip = tmp_path / "blip"
    build_tiny_folder(blip)
    dtype = lambda c: next((c.net if hasattr(c, "net") else c.blip.model).parameters()).dtype  # noqa: E731
    assert dtype(load_captioner(blip, "auto")) == (torch.bfloat16 if native else torch.float32)
    assert dtype(load_captioner(blip, "fp32")) == torch.float32
    assert dtype(load_captioner(blip, "bf16")) == torch.bfloat16
    assert dtype(load_captioner(None, "auto")) == torch.float32
    assert dtype(load_captioner(None, "bf16")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown captioner precision 'fp16'; known: auto, bf16, fp32"):
        load_captioner(None, "fp16")


class Colours:
    """A stand-in captioner that says each picture's colour, so that the files' contents are known."""
    name = "test"

    def caption(self, images):
        return ["colour %d %d %d" % im.getpixel((0, 0)) for im in images]


def _folder(tmp_path, n=3):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (16, 16), (i, 2 * i, 3 * i)).save(folder / f"{i}.png")
    (folder / "notes.md").write_text("not a picture")
    return folder


def test_txt_captions_skip_and_overwrite(tmp_path):
    folder = _folder(tmp_path)
    (folder / "1.txt").write_text("my own caption\n")
    done = caption_folder(folder, Colours(), prefix="sks, ", suffix=", photo", progress=False)
    assert done.skipped == 1 and [p.name for p in done.written] == ["0.txt", "2.txt"]
    assert (folder / "0.txt").read_text() == "sks, colour 0 0 0, photo\n"
    assert (folder / "1.txt").read_text() == "my own caption\n"
    done = caption_folder(folder, Colours(), overwrite=True, progress=False)
    assert done.skipped == 0 and (folder / "1.txt").read_text() == "colour 1 2 3\n"
    assert not list(folder.glob(".*tmp"))


def test_jsonl_keeps_other_rows_and_fields(tmp_path):
    folder = _folder(tmp_path)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "2.png", "text": "mine", "score": 5}) + "\n"
                                           + json.dumps({"file_name": "0.png", "text": "", "score": 1}) + "\n")
    done = caption_folder(folder, Colours(), format="jsonl", progress=False)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert done.skipped == 1 and done.metadata == folder / "metadata.jsonl"
    assert rows == [{"file_name": "2.png", "text": "mine", "score": 5},
                    {"file_name": "0.png", "text": "colour 0 0 0", "score": 1},
                    {"file_name": "1.png", "text": "colour 1 2 3"}]
    from plainsd.train.data import FolderDataset
    assert [text for _, text in FolderDataset(folder).items] == ["mine", "colour 0 0 0", "colour 1 2 3"]


def test_bad_folders_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        caption_folder(tmp_path, Colours(), progress=False)
    folder = _folder(tmp_path)
    (folder / "3.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*3.png"):
        caption_folder(folder, Colours(), progress=False)
    assert not list(folder.glob("*.txt"))
    with pytest.raises(ValueError, match="unknown caption format 'csv'; allowed: txt, jsonl"):
        caption_folder(folder, Colours(), format="csv", progress=False)
    (folder / "3.png").unlink()
    (folder / "metadata.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        caption_folder(folder, Colours(), format="jsonl", progress=False)


def test_caption_command(tmp_path, capsys):
    folder = tmp_path / "renders"
    folder.mkdir()
    scenes = held_out_scenes(3, 1)
    for i, s in enumerate(scenes):
        render(s).save(folder / f"{i}.png")
    assert main(["caption", str(folder), "--prefix", "sks, ", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "captioned 3 picture(s) with the plainsd captioner" in out
    texts = [(folder / f"{i}.txt").read_text() for i in range(3)]
    expected = ShapesCaptioner(read_captioner(DEFAULT_CAPTIONER)).caption([render(s) for s in scenes])
    assert texts == [f"sks, {c}\n" for c in expected]
    assert main(["caption", str(folder), "--quiet", "--format", "jsonl"]) == 0
    assert "captioned 3 picture(s)" in capsys.readouterr().out
    assert main(["caption", str(folder), "--quiet"]) == 0
    assert "captioned 0 picture(s)" in (out := capsys.readouterr()).out and "skipped 3" in out.out
    assert "also holds a metadata.jsonl" in out.err
    assert main(["caption", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["caption", str(folder), "--captioner", "nothing"]) == 2
    assert "unknown captioner 'nothing'" in capsys.readouterr().err
