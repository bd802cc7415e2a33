"""A1111's styles and scripts through the API: /sdapi/v1/prompt-styles, styles, /sdapi/v1/scripts, script-info, and
the X/Y/Z plot as script_name / script_args."""

import base64
import io
import json

import pytest
from PIL import Image

import plainsd
from plainsd import xyz
from plainsd.pnginfo import parse_infotext

from fastapi.testclient import TestClient

from plainsd.server import Limits, create_app

STYLES = "name,prompt,negative_prompt\nwrap,a picture of {prompt},blurry\nplain,,\n"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    plainsd.save(plainsd.build("tiny", seed=0), folder / "alpha.safetensors")
    plainsd.save(plainsd.build("tiny", seed=1), folder / "beta.safetensors")
    styles = folder / "styles.csv"
    styles.write_text(STYLES)
    app = create_app(models_dir=folder, styles=styles, limits=Limits(max_size=256, max_steps=30, max_images=6))
    with TestClient(app) as c:
        yield c


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


BASE = {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "seed": 3}


def test_prompt_styles_are_listed_and_applied(client):
    assert client.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "wrap", "prompt": "a picture of {prompt}", "negative_prompt": "blurry"},
        {"name": "plain", "prompt": "", "negative_prompt": ""}]
    styled = client.post("/sdapi/v1/txt2img", json={**BASE, "styles": ["wrap"]}).json()
    plain = client.post("/sdapi/v1/txt2img", json={**BASE, "prompt": "a picture of a red circle",
                                                   "negative_prompt": "blurry"}).json()
    assert styled["images"] == plain["images"]  # the same picture, the same infotext
    fields = parse_infotext(decode(styled["images"][0]).info["parameters"])
    assert fields["Prompt"] == "a picture of a red circle" and fields["Negative prompt"] == "blurry"
    info = json.loads(styled["info"])
    assert info["styles"] == ["wrap"] and info["prompt"] == "a picture of a red circle"  # A1111's: styled
    assert info["all_negative_prompts"] == ["blurry"]
    r = client.post("/sdapi/v1/txt2img", json={**BASE, "styles": ["nope"]})
    assert r.status_code == 422 and "unknown style 'nope'; the styles file has 'wrap', 'plain'" in r.json()["detail"]


def test_server_without_styles_refuses_them(tmp_path):
    app = create_app(model=_model(tmp_path))
    with TestClient(app) as c:
        assert c.get("/sdapi/v1/prompt-styles").json() == []
        r = c.post("/sdapi/v1/txt2img", json={**BASE, "styles": ["wrap"]})
        assert r.status_code == 422 and "need a styles file" in r.json()["detail"]
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv is not a styles file"):
        create_app(model=_model(tmp_path), styles=tmp_path / "bad.csv")


def _model(folder):
    path = folder / "m.safetensors"
    if not path.exists():
        plainsd.save(plainsd.build("tiny", seed=0), path)
    return path


def test_scripts_and_script_info_in_a1111s_shape(client):
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": ["x/y/z plot"], "img2img": ["x/y/z plot"]}
    info = client.get("/sdapi/v1/script-info").json()
    assert [(s["name"], s["is_img2img"], s["is_alwayson"]) for s in info] == [
        ("x/y/z plot", False, False), ("x/y/z plot", True, False)]
    args = info[0]["args"]
    assert len(args) == 18 and args[0]["label"] == "X type" and args[0]["choices"] == xyz.axis_labels("txt2img")
    assert args[16] == {"label": "Grid margins (px)", "value": 0, "minimum": 0, "maximum": 500, "step": 2,
                        "choices": None}
    assert set(args[0]) == {"label", "value", "minimum", "maximum", "step", "choices"}


def test_xyz_plot_through_the_api(client):
    # A1111's script_args: x_type 1 (Seed), y_type 6 (CFG Scale) as indices; the rest left to their defaults
    body = {**BASE, "script_name": "X/Y/Z plot",
            "script_args": [1, "5, 6", None, 6, "2, 7", None, 0, "", None, False, True]}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    images = [decode(b) for b in r.json()["images"]]
    assert [im.size for im in images] == [(64, 64)] + [(32, 32)] * 4  # the grid, then the cells
    for image, (cfg, seed) in zip(images[1:], [(2, 5), (2, 6), (7, 5), (7, 6)]):
        alone = client.post("/sdapi/v1/txt2img", json={**BASE, "seed": seed, "cfg_scale": cfg}).json()
        assert image.tobytes() == decode(alone["images"][0]).tobytes()
    fields = parse_infotext(images[0].info["parameters"])
    assert fields["Script"] == "X/Y/Z plot" and fields["X Type"] == "Seed" and fields["Y Values"] == "2, 7"
    assert json.loads(r.json()["info"])["all_seeds"] == [5, 5, 6, 5, 6]


def test_xyz_checkpoint_axis_chooses_among_the_servers_models(client):
    body = {**BASE, "script_name": "x/y/z plot",
            "script_args": [11, "", ["alpha.safetensors", "beta.safetensors"], 0, "", None, 0, "", None, False, True]}
    images = [decode(b) for b in client.post("/sdapi/v1/txt2img", json=body).json()["images"]]
    assert [parse_infotext(im.info["parameters"])["Model"] for im in images[1:]] == ["alpha", "beta"]
    assert images[1].tobytes() != images[2].tobytes()
    body["script_args"][2] = ["gamma.safetensors"]
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422 and "unknown model 'gamma.safetensors'" in r.json()["detail"]


@pytest.mark.parametrize("extra, words", [
    ({"script_name": "prompt matrix"}, "unknown script 'prompt matrix' for txt2img; plainsd runs 'x/y/z plot'"),
    ({"script_args": [1, "2"]}, "script_args were given without a script_name"),
    ({"script_name": "x/y/z plot", "script_args": [12, "1"]}, "'Negative Guidance minimum sigma' is not drawn"),
    ({"script_name": "x/y/z plot", "script_args": [4, "25, 40"]}, "steps may be at most 30"),
    ({"script_name": "x/y/z plot", "script_args": [1, "1-7"]}, "more than 6 images"),
    ({"script_name": "x/y/z plot", "script_args": [1, "1", None, 0, "", None, 0, "", None, True, False, False,
                                                   False, False, False, False, 600]}, "margin_size must be"),
    ({"script_name": "x/y/z plot", "script_args": [1, ""]}, "the X axis (Seed) has no values"),
])
def test_bad_scripts_get_422_with_one_sentence(client, extra, words):
    r = client.post("/sdapi/v1/txt2img", json={**BASE, **extra})
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"]


def test_the_page_offers_the_servers_styles(client):
    html = client.get("/").text
    assert '<select id="styles" multiple' in html and 'getJSON("/sdapi/v1/prompt-styles")' in html
    assert "body.styles = styles" in html
