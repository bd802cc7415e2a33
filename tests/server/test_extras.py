"""A1111's Extras, upscaler lists, hires fix by upscaler name and SD upscale through the API (a tiny model and
random-weight upscaler files)."""

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

import plainsd
from plainsd import upscale
from plainsd.pnginfo import parse_infotext
from plainsd.server import Limits, create_app
from tests.test_upscale import _compact, _esrgan_old, _picture, _write

pytest.importorskip("spandrel")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    _write(_esrgan_old(seed=4, scale=2), root / "ESRGAN" / "2x-test.pth")
    _write(_compact(seed=5), root / "RealESRGAN" / "RealESRGAN_x4plus.pth")
    plainsd.save(plainsd.build("tiny", seed=0), root / "tiny.safetensors")
    return root


@pytest.fixture(scope="module")
def client(folder):
    app = create_app(model=folder / "tiny.safetensors", upscalers_dir=folder, precision="fp32",
                     limits=Limits(max_size=256, max_steps=30, max_images=4, max_image_pixels=250 * 250))
    with TestClient(app) as c:
        yield c


def _b64(image: Image.Image, parameters: str | None = None) -> str:
    meta = PngImagePlugin.PngInfo()
    if parameters:
        meta.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode()


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_upscaler_lists(client, folder):
    rows = {r["name"]: r for r in client.get("/sdapi/v1/upscalers").json()}
    assert list(rows)[:3] == ["None", "Lanczos", "Nearest"]
    assert rows["2x-test"] == {"name": "2x-test", "model_name": "ESRGAN", "model_url": None, "scale": 2,
                               "model_path": str(folder / "ESRGAN" / "2x-test.pth")}
    assert rows["R-ESRGAN 4x+"]["scale"] == 4
    assert client.get("/sdapi/v1/realesrgan-models").json() == [
        {"name": "R-ESRGAN 4x+", "path": str(folder / "RealESRGAN" / "RealESRGAN_x4plus.pth"), "scale": 4}]


def test_extra_single_image(client, folder):
    picture = _picture(40, 28)
    r = client.post("/sdapi/v1/extra-single-image", json={
        "image": _b64(picture, "a red circle\nSteps: 20, Seed: 1"), "upscaler_1": "2x-test", "upscaling_resize": 2,
        "codeformer_weight": 0, "gfpgan_visibility": 0, "upscale_first": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: 2x-test</p>"
    out = _image(body["image"])
    expected = upscale.upscale(picture, "2x-test", 2, folder, precision="fp32")
    assert out.size == (80, 56) and np.array_equal(np.asarray(out.convert("RGB")), np.asarray(expected))
    # the picture's parameters kept, the upscaling written beside them as A1111 writes it
    assert out.info["parameters"] == "a red circle\nSteps: 20, Seed: 1"
    assert out.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: 2x-test"


def test_extra_batch_images_scale_to(client):
    pictures = [_picture(40, 28, seed=1), _picture(30, 30, seed=2)]
    r = client.post("/sdapi/v1/extra-batch-images", json={
        "imageList": [{"data": _b64(p), "name": f"p{i}.png"} for i, p in enumerate(pictures)],
        "resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 64, "upscaler_1": "Lanczos",
        "upscaler_2": "R-ESRGAN 4x+", "extras_upscaler_2_visibility": 0.5})
    assert r.status_code == 200, r.text
    outs = [_image(b) for b in r.json()["images"]]
    assert [o.size for o in outs] == [(100, 64), (100, 64)]
    assert outs[1].info["postprocessing"] == ("Postprocess upscale to: 100x64, Postprocess crop to: 100x64, "
                                              "Postprocess upscaler: Lanczos, Postprocess upscaler 2: R-ESRGAN 4x+")
    assert "parameters" not in outs[0].info


@pytest.mark.parametrize("body, words", [
    ({"gfpgan_visibility": 0.5}, "gfpgan_visibility: plainsd has no face restoration"),
    ({"codeformer_weight": 0.5}, "codeformer_weight: plainsd has no face restoration"),
    ({"upscaler_1": "UltraSharp"}, "no upscaler named 'UltraSharp' in "),
    ({"upscaler_1": "Lanczos", "upscaler_2": "None", "extras_upscaler_2_visibility": 0.3}, "nothing to blend"),
    ({"upscaling_resize": 9}, "upscaling_resize should be less than or equal to 8"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 8}, "results may have at most 62500 pixels"),
    ({"resize_mode": 2}, "resize_mode"),
    ({"face_restorer": "x"}, "unknown field face_restorer"),
])
def test_extras_refusals(client, body, words):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": _b64(_picture(40, 28)), **body})
    assert r.status_code == 422 and words in r.json().get("detail", ""), r.status_code


def test_hires_fix_by_upscaler_name_and_settings(client):
    req = {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "seed": 3, "enable_hr": True,
           "hr_scale": 2, "denoising_strength": 0.5}
    r = client.post("/sdapi/v1/txt2img", json={**req, "hr_upscaler": "2x-test",
                                               "override_settings": {"ESRGAN_tile": 16, "ESRGAN_tile_overlap": 4}})
    assert r.status_code == 200, r.text
    assert "Hires upscaler: 2x-test" in r.json()["info"]
    bad = client.post("/sdapi/v1/txt2img", json={**req, "hr_upscaler": "UltraSharp"})
    assert bad.status_code == 422 and "plainsd has Latent" in bad.json()["detail"] and "2x-test" in bad.json()["detail"]
    tiles = client.post("/sdapi/v1/options", json={"ESRGAN_tile": 8})
    assert tiles.status_code == 422 and "ESRGAN_tile" in tiles.json()["detail"]


def test_sd_upscale_script(client):
    r = client.post("/sdapi/v1/img2img", json={
        "prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "seed": 3, "denoising_strength": 0.3,
        "init_images": [_b64(_picture(32, 32))], "script_name": "SD upscale", "script_args": ["", 8, "2x-test", 2]})
    assert r.status_code == 200, r.text
    assert _image(r.json()["images"][0]).size == (64, 64)
    fields = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
    assert (fields["SD upscale overlap"], fields["SD upscale upscaler"], fields["Size"]) == ("8", "2x-test", "32x32")
