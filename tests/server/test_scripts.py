"""A1111's styles and scripts through the API: /sdapi/v1/prompt-styles, styles, /sdapi/v1/scripts, script-info, and
the X/Y/Z plot as script_name / script_args."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

import plainsd
from plainsd import images as imgs
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
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": ["x/y/z plot"],
                                                      "img2img": ["x/y/z plot", "poor man's outpainting",
                                                                  "sd upscale"]}
    info = client.get("/sdapi/v1/script-info").json()
    assert [(s["name"], s["is_img2img"], s["is_alwayson"]) for s in info] == [
        ("x/y/z plot", False, False), ("x/y/z plot", True, False), ("poor man's outpainting", True, False),
        ("sd upscale", True, False)]
    assert info[2]["args"] == [  # A1111's ui(): the sliders' ranges, the radio's and checkboxes' choices
        {"label": "Pixels to expand", "value": 128, "minimum": 8, "maximum": 256, "step": 8, "choices": None},
        {"label": "Mask blur", "value": 4, "minimum": 0, "maximum": 64, "step": 1, "choices": None},
        {"label": "Masked content", "value": "fill", "minimum": None, "maximum": None, "step": None,
         "choices": ["fill", "original", "latent noise", "latent nothing"]},
        {"label": "Outpainting direction", "value": ["left", "right", "up", "down"], "minimum": None,
         "maximum": None, "step": None, "choices": ["left", "right", "up", "down"]}]
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
    ({"script_name": "x/y/z plot", "script_args": [32, "1"]}, "'Face restore' is not drawn"),
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


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


INIT = Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 64, 3), dtype=np.uint8))
OUTPAINT = {**BASE, "init_images": [b64png(INIT)], "script_name": "Poor man's outpainting"}


def test_poor_mans_outpainting_through_the_api(client):
    # 16 pixels left and right, mask blur 2, masked content 0 (fill): A1111 widens 64 + 32 to 128, 32 a side
    r = client.post("/sdapi/v1/img2img", json={**OUTPAINT, "script_args": [16, 2, 0, ["left", "right"]]})
    assert r.status_code == 200, r.text
    out = decode(r.json()["images"][0])
    assert out.size == (128, 64)
    canvas, mask, latent_mask = imgs.outpaint_canvas(INIT, 16, 16, 0, 0, 2)  # the pipeline's own canvas
    assert canvas.crop((32, 0, 96, 64)).tobytes() == INIT.tobytes()
    kept = np.asarray(imgs.blur_mask(mask, 4)) == 0  # the mask blurred by twice mask_blur, as A1111 does
    pixels, before = np.asarray(out.convert("RGB")), np.asarray(canvas)
    assert kept.sum() > 64 * 30 and np.array_equal(pixels[kept], before[kept])
    filled = np.asarray(imgs.fill(canvas, latent_mask)).astype(int)
    assert np.abs(pixels[:, :24].astype(int) - filled[:, :24]).mean() > 5  # the new area is drawn, not the fill
    fields = parse_infotext(out.info["parameters"])
    assert (fields["Size"], fields["Mask blur"], fields["Masked content"]) == ("128x64", "4", "fill")
    up = decode(client.post("/sdapi/v1/img2img", json={**OUTPAINT, "script_args": [8, 0, 1, ["up"]]}).json()["images"][0])
    assert up.size == (64, 128) and np.array_equal(np.asarray(up.convert("RGB"))[64:], np.asarray(INIT))


@pytest.mark.parametrize("script_args, words", [
    ([-8], "Pixels to expand (script_args[0]) must be a whole number, 1 or more, got -8"),
    ([16, -1], "Mask blur (script_args[1]) must be a whole number, 0 or more"),
    ([16, 4, 7], "Masked content (script_args[2]) must be 0 (fill), 1 (original)"),
    ([16, 4, 0, ["left", "sideways"]], "Outpainting direction (script_args[3]) must be a list of one or more of "
                                       "left, right, up, down, got ['left', 'sideways']"),
    ([16, 4, 0, []], "Outpainting direction (script_args[3])"),
    ([16, 4, 0, ["up"], 1], "takes up to 4 script_args"),
    ([128, 4, 0, ["left", "right"]], "outpainting's canvas of 320x64: width and height must be between 8 and 256"),
])
def test_bad_outpainting_args_get_422_naming_them(client, script_args, words):
    r = client.post("/sdapi/v1/img2img", json={**OUTPAINT, "script_args": script_args})
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"]


def test_outpainting_refuses_what_it_would_override(client):
    r = client.post("/sdapi/v1/img2img", json={**OUTPAINT, "mask": b64png(Image.new("L", (64, 64), 255))})
    assert r.status_code == 422 and "makes its own mask of the new area; leave out mask" in r.json()["detail"]
    r = client.post("/sdapi/v1/img2img", json={**OUTPAINT, "batch_size": 2})
    assert r.status_code == 422 and "leave batch_size and n_iter at 1" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={**BASE, "script_name": "poor man's outpainting"})
    assert r.status_code == 422 and "unknown script \"poor man's outpainting\" for txt2img" in r.json()["detail"]


def test_the_page_offers_the_servers_styles(client):
    html = client.get("/").text
    assert '<select id="styles" multiple' in html and 'getJSON("/sdapi/v1/prompt-styles")' in html
    assert "body.styles = styles" in html


def test_xyz_refiner_axis_names_the_servers_models(client):
    """The Refiner checkpoint axis by A1111's index: None, or one of the server's models by name (any model with
    the same latents can be a refiner); the cell with one is the picture a request naming it draws."""
    axis = xyz.axis_labels("txt2img").index("Refiner checkpoint")
    body = {**BASE, "steps": 4, "script_name": "x/y/z plot",
            "script_args": [axis, "", ["None", "beta.safetensors"], 0, "", None, 0, "", None, False, True]}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    images = [decode(b) for b in r.json()["images"]]
    fields = [parse_infotext(im.info["parameters"]) for im in images[1:]]
    assert "Refiner" not in fields[0] and fields[1]["Refiner"].startswith("beta")
    alone = client.post("/sdapi/v1/txt2img", json={**BASE, "steps": 4, "refiner_checkpoint": "beta.safetensors"})
    assert images[2].tobytes() == decode(alone.json()["images"][0]).tobytes() != images[1].tobytes()
