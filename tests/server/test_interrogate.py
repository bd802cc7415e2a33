"""/sdapi/v1/interrogate (A1111's fields): the answer is the captioner's caption of the picture; the models
plainsd has not got are refused with one sentence; the web page's Interrogate button asks for it."""

import base64
import io

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import plainsd
from plainsd.captioning import load_captioner, save_captioner
from plainsd.config import CaptionerConfig
from plainsd.eval.metrics import held_out_scenes
from plainsd.models.captioner import Captioner
from plainsd.server import create_app
from plainsd.train.captioner import WORDS
from plainsd.train.data import render


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrogate")
    plainsd.save(plainsd.build("tiny", seed=0), root / "tiny.safetensors")
    torch.manual_seed(1)
    net = Captioner(CaptionerConfig(words=WORDS, channels=(8, 8), width=16, layers=1, heads=2, max_length=10))
    save_captioner(net, root / "own.safetensors", torch.float32)
    return root


@pytest.fixture(scope="module")
def client(folder):
    with TestClient(create_app(model=folder / "tiny.safetensors", precision="fp32")) as c:
        yield c


def test_the_answer_is_the_shipped_captioners_caption(client):
    images = [render(s) for s in held_out_scenes(3, 1)]
    expected = load_captioner().caption(images)
    for image, caption in zip(images, expected):
        for model in ("clip", "plainsd"):
            r = client.post("/sdapi/v1/interrogate", json={"image": b64png(image), "model": model})
            assert r.status_code == 200 and r.json() == {"caption": caption}
    # A1111's default model is clip; a data: URL is read too
    r = client.post("/sdapi/v1/interrogate", json={"image": "data:image/png;base64," + b64png(images[0])})
    assert r.json() == {"caption": expected[0]}


def test_refusals(client):
    image = b64png(render(held_out_scenes(1, 1)[0]))
    cases = [({"image": image, "model": "deepdanbooru"}, "no DeepDanbooru tagger; allowed: clip, blip, plainsd"),
             ({"image": image, "model": "wd14"}, "unknown interrogate model 'wd14'"),
             ({"image": image, "model": "blip"}, "needs a BLIP captioning model"),
             ({"image": ""}, "image must be a base64-encoded image"),
             ({"image": "abc$"}, "not valid base64"),
             ({"image": image, "clip_model": "ViT-L"}, "clip_model")]
    for body, words in cases:
        r = client.post("/sdapi/v1/interrogate", json=body)
        assert r.status_code == 422 and words in r.json()["detail"], (body.keys(), r.json())


def test_the_servers_own_captioner(folder):
    image = render(held_out_scenes(1, 1)[0])
    own = load_captioner(folder / "own.safetensors").caption([image])[0]
    shipped = load_captioner().caption([image])[0]
    assert own != shipped  # a random network says something else, which is how the test tells them apart
    app = create_app(model=folder / "tiny.safetensors", precision="fp32", captioner=folder / "own.safetensors")
    with TestClient(app) as c:
        assert c.post("/sdapi/v1/interrogate", json={"image": b64png(image)}).json() == {"caption": own}
        assert c.post("/sdapi/v1/interrogate", json={"image": b64png(image), "model": "plainsd"}).json() == {
            "caption": shipped}
    with pytest.raises(ValueError, match="unknown captioner"):
        create_app(model=folder / "tiny.safetensors", captioner=folder / "missing")


def test_the_page_has_an_interrogate_button(client):
    page = client.get("/").text
    assert 'id="interrogate"' in page and '"/sdapi/v1/interrogate"' in page
    assert '$("prompt").value = r.caption' in page
