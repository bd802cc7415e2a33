"""A1111's ControlNet extension's API: alwayson_scripts units mapped onto request.ControlUnit (every unit field
honoured or refused by name), the detected maps appended to the answer, and the /controlnet/* routes' answers as
the extension gives them (Mikubill/sd-webui-controlnet scripts/api.py, internal_controlnet/args.py)."""

import base64
import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import plainsd
from plainsd import control, detectors, pipeline
from plainsd.models.controlnet import ControlNet
from plainsd.request import ControlUnit, GenerationRequest
from plainsd.server import Limits, create_app
from plainsd.server import controlnet as cn
from plainsd.server.api import BadRequest, Img2ImgRequest, Txt2ImgRequest, generation_request

BASE = {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "seed": 1, "sampler_name": "Euler"}


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def square(size=(48, 40), box=(10, 8, 30, 28)) -> Image.Image:
    image = Image.new("RGB", size, "black")
    ImageDraw.Draw(image).rectangle(box, fill=(250, 250, 250))
    return image


SQUARE = square()


def save_random_controlnet(sd, path):
    """A ControlNet for the tiny model whose zero convolutions are not zero, so that it changes the picture."""
    torch.manual_seed(0)
    net = ControlNet(sd.unet.config)
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.2)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    sd = plainsd.build("tiny", seed=0)
    plainsd.save(sd, models / "tiny.safetensors")
    controlnets = tmp_path_factory.mktemp("controlnet")
    save_random_controlnet(sd, controlnets / "control_tiny_canny.safetensors")
    from tests.test_control import random_adapter
    from plainsd.weights import save_adapter
    save_adapter(random_adapter(sd.unet.config), controlnets / "t2iadapter_tiny_canny.safetensors")
    return models, controlnets


@pytest.fixture(scope="module")
def name(folders):
    """The test's ControlNet as the extension lists it: "control_tiny_canny [hash]"."""
    (found,) = [n for n in cn.model_names(folders[1]) if n.startswith("control_tiny_canny [")]
    return found


@pytest.fixture(scope="module")
def client(folders):
    app = create_app(models_dir=folders[0], controlnet_dir=folders[1],
                     limits=Limits(max_size=256, max_steps=30, max_images=4))
    with TestClient(app) as c:
        yield c


def unit(**fields) -> dict:
    return {"enabled": True, "module": "canny", "model": "control_tiny_canny", "image": b64png(SQUARE), **fields}


def mapped(folders, *units, kind="txt2img", **body):
    """The GenerationRequest the server makes of a request with these units."""
    model = Img2ImgRequest if kind == "img2img" else Txt2ImgRequest
    if kind == "img2img":
        body.setdefault("init_images", [b64png(square((40, 40)))])
    req = model(**BASE, **body, alwayson_scripts={"controlnet": {"args": list(units)}})
    return generation_request(req, kind, Limits(), {**cn.SETTINGS}, controlnet_dir=str(folders[1]))


def refusal(folders, *units, kind="txt2img", **body) -> str:
    with pytest.raises(BadRequest) as e:
        mapped(folders, *units, kind=kind, **body)
    return str(e.value)


# --- the units -> ControlUnit -----------------------------------------------------------------------------------

def test_a_unit_becomes_the_control_unit_with_the_extensions_defaults(folders, name):
    request = mapped(folders, unit(weight=0.7, guidance_start=0.2, guidance_end=0.9, pixel_perfect=True))
    (control,) = request.controlnet
    assert control.model == name
    assert control.image.tobytes() == SQUARE.tobytes() and control.image.size == SQUARE.size
    assert (control.module, control.weight, control.guidance_start, control.guidance_end) == ("canny", 0.7, 0.2, 0.9)
    assert (control.control_mode, control.resize_mode, control.pixel_perfect) == ("Balanced", "Crop and Resize", True)
    # processor_res and thresholds left at the extension's -1: the module's defaults
    assert control.processor_res == 512 and control.threshold_a is None and control.threshold_b is None


def test_disabled_units_and_units_without_enabled_are_dropped(folders):
    assert mapped(folders, unit(enabled=False)).controlnet == ()
    without = unit()
    del without["enabled"]  # the extension's default is off
    assert mapped(folders, without).controlnet == ()
    assert len(mapped(folders, unit(enabled=False), unit(weight=0.5)).controlnet) == 1


def test_no_alwayson_scripts_or_no_args_is_no_unit(folders):
    req = Txt2ImgRequest(**BASE)
    assert generation_request(req, "txt2img", Limits(), {**cn.SETTINGS}).controlnet == ()
    assert mapped(folders).controlnet == ()


@pytest.mark.parametrize("sent, name", [(0, "Just Resize"), (1, "Crop and Resize"), (2, "Resize and Fill"),
                                        (3, "Just Resize"), ("Resize and Fill", "Resize and Fill"),
                                        ("Inner Fit (Scale to Fit)", "Crop and Resize"),
                                        ("Envelope (Outer Fit)", "Resize and Fill")])
def test_resize_modes_by_name_older_name_and_number(folders, sent, name):
    assert mapped(folders, unit(resize_mode=sent)).controlnet[0].resize_mode == name


@pytest.mark.parametrize("sent, name", [(0, "Balanced"), (1, "My prompt is more important"),
                                        (2, "ControlNet is more important"),
                                        ("My prompt is more important", "My prompt is more important")])
def test_control_modes_by_name_and_number(folders, sent, name):
    assert mapped(folders, unit(control_mode=sent)).controlnet[0].control_mode == name


def test_thresholds_and_resolution(folders):
    control = mapped(folders, unit(processor_res=256, threshold_a=50, threshold_b=150)).controlnet[0]
    assert (control.processor_res, control.threshold_a, control.threshold_b) == (256, 50, 150)
    # negative: the module's default, as the extension documents
    control = mapped(folders, unit(processor_res=-100, threshold_a=-1, threshold_b=-5)).controlnet[0]
    assert (control.processor_res, control.threshold_a, control.threshold_b) == (512, None, None)
    # a module without sliders does not use them (the extension's example sends 64 with module none)
    control = mapped(folders, unit(module="none", threshold_a=64, threshold_b=64)).controlnet[0]
    assert (control.threshold_a, control.threshold_b) == (None, None)


def test_modules_by_the_extensions_alias(folders):
    for name, info in detectors.MODULES.items():
        label = getattr(info, "label", name)
        if name in cn.module_list()["module_list"]:
            assert mapped(folders, unit(module=label)).controlnet[0].module == name


def test_older_spellings_of_the_fields(folders):
    control = mapped(folders, {"enabled": True, "module": "canny", "model": "control_tiny_canny",
                               "input_image": b64png(SQUARE), "guidance": 0.6, "lowvram": True}).controlnet[0]
    assert control.image.tobytes() == SQUARE.tobytes() and control.guidance_end == 0.6
    assert "input_image and image are the same field" in refusal(folders, unit(input_image=b64png(SQUARE)))
    # null older spellings are not sent
    control = mapped(folders, unit(guidance=None, lowvram=None, input_image=None, mask_image=None)).controlnet[0]
    assert control.guidance_end == 1.0 and control.image.tobytes() == SQUARE.tobytes()
    assert "args[0].mask: " in refusal(folders, unit(mask_image=b64png(SQUARE)))


@pytest.mark.parametrize("image", [
    lambda b: {"image": b, "mask": None}, lambda b: [b, None], lambda b: [{"image": b}],
    lambda b: "data:image/png;base64," + b])
def test_the_extensions_forms_of_the_image(folders, image):
    control = mapped(folders, unit(image=image(b64png(SQUARE)))).controlnet[0]
    assert control.image.tobytes() == SQUARE.tobytes()


def test_a_transparent_control_image_is_put_on_white_as_the_extension_does(folders):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 8, 16))
    control = mapped(folders, unit(image=b64png(rgba))).controlnet[0]
    assert control.image.getpixel((2, 2)) == (255, 0, 0) and control.image.getpixel((12, 2)) == (255, 255, 255)


def test_model_names_as_the_extension_looks_them_up(folders, name):
    for sent in (name, "control_tiny_canny", "CONTROL_TINY_CANNY", "control_tiny_canny [0000000000]", "tiny_canny"):
        assert mapped(folders, unit(model=sent)).controlnet[0].model == name, sent
    refused = refusal(folders, unit(model="depth"))  # (the shipped ControlNet is listed too, first)
    assert "unknown ControlNet model 'depth'; the server has " in refused and "control_tiny_canny [" in refused
    # a path is never a model: only listed names are used
    path = str(folders[1] / "control_tiny_canny.safetensors")
    assert "unknown ControlNet model" in refusal(folders, unit(model="/" + path))


def test_img2img_units_without_an_image_use_the_init_image(folders):
    control = mapped(folders, unit(image=None), kind="img2img").controlnet[0]
    assert control.image is None  # (the pipeline takes the init image, with img2img's resize mode)
    words = refusal(folders, unit(image=None))
    assert words.startswith("alwayson_scripts.controlnet.args[0].image: the unit has no control image")


@pytest.mark.parametrize("name", sorted(cn.UNIT_NOT_SUPPORTED))
def test_unsupported_unit_fields_are_refused_naming_the_field(folders, name):
    value = {"mask": b64png(SQUARE), "is_ui": True, "input_mode": "batch", "batch_images": "folder",
             "output_dir": "out", "loopback": True, "inpaint_crop_input_image": False, "hr_option": "Low res only",
             "advanced_weighting": [1.0] * 13, "effective_region_mask": b64png(SQUARE), "pulid_mode": "Extremely style",
             "union_control_type": "Depth", "ipadapter_input": "AAAA", "batch_mask_dir": "masks",
             "animatediff_batch": True, "batch_modifiers": ["x"], "batch_image_files": ["a.png"],
             "batch_keyframe_idx": "0"}[name]
    words = refusal(folders, unit(**{name: value}))
    assert words.startswith(f"alwayson_scripts.controlnet.args[0].{name}: ") and words.count(". ") == 0, words
    # a disabled unit asks for nothing: accepted
    assert mapped(folders, unit(enabled=False, **{name: value})).controlnet == ()


@pytest.mark.parametrize("field, value, words", [
    ("foo", 1, "unknown field alwayson_scripts.controlnet.args[0].foo:"),
    ("weight", 2.5, "alwayson_scripts.controlnet.args[0].weight should be less than or equal to 2, got 2.5"),
    ("guidance_end", 1.5, "alwayson_scripts.controlnet.args[0].guidance_end should be less than or equal to 1"),
    ("guidance_start", 0.9, "guidance start and end must satisfy 0 <= start <= end <= 1"),
    ("resize_mode", 4, "resize_mode: unknown resize mode 4; the extension's are Just Resize, Crop and Resize, Resize"),
    ("control_mode", "balanced", "control_mode: unknown control mode 'balanced'; the extension's are Balanced,"),
    ("module", "no_such", "alwayson_scripts.controlnet.args[0].module: unknown preprocessor 'no_such';"),
    ("model", "None", "alwayson_scripts.controlnet.args[0].model: the unit names no ControlNet model"),
    ("image", "not base64!", "alwayson_scripts.controlnet.args[0].image is not valid base64"),
    ("image", {"image": "x", "other": 1}, "args[0].image: the extension takes a control image as base64, {"),
    ("image", [{"image": "a"}, {"image": "b"}], "image holds 2 images; plainsd takes one control image per unit"),
])
def test_bad_unit_fields_are_refused_naming_the_field(folders, field, value, words):
    body = unit(**{field: value}, **({"guidance_end": 0.5} if field == "guidance_start" else {}))
    assert words in refusal(folders, body)


def test_unknown_modules_are_refused_in_disabled_units_too_as_the_extension_does(folders):
    assert "unknown preprocessor 'no_such'" in refusal(folders, unit(enabled=False, module="no_such"))


def test_other_scripts_and_too_many_units_are_refused(folders):
    req = Txt2ImgRequest(**BASE, alwayson_scripts={"ADetailer": {"args": []}})
    with pytest.raises(BadRequest, match=r"^alwayson_scripts asks for ADetailer; plainsd has only the ControlNet"):
        generation_request(req, "txt2img", Limits(), {**cn.SETTINGS})
    words = refusal(folders, unit(), unit(), unit(), unit())
    assert words.startswith("alwayson_scripts.controlnet.args holds 4 units; the extension takes at most "
                            "control_net_unit_count (3)")
    req = Txt2ImgRequest(**BASE, alwayson_scripts={"ControlNet": {"args": [unit()]}, "controlnet": {"args": []}})
    with pytest.raises(BadRequest, match="names the ControlNet extension twice"):
        generation_request(req, "txt2img", Limits(), {**cn.SETTINGS}, controlnet_dir=str(folders[1]))


# --- the routes -------------------------------------------------------------------------------------------------

def test_version_and_settings(client):
    assert client.get("/controlnet/version").json() == {"version": 3}
    assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 3}
    assert client.post("/sdapi/v1/options", json={"control_net_unit_count": 4}).status_code == 200
    try:
        assert client.get("/controlnet/settings").json() == {"control_net_unit_count": 4}
        r = client.post("/sdapi/v1/options", json={"control_net_unit_count": 0})
        assert r.status_code == 422 and r.json()["detail"].startswith("control_net_unit_count must be a whole number")
    finally:
        client.post("/sdapi/v1/options", json={"control_net_unit_count": 3})


def test_model_list_names_the_folders_models_as_the_extension(client, folders):
    for query in ("", "?update=true", "?update=false"):
        r = client.get("/controlnet/model_list" + query).json()
        assert r == {"model_list": cn.model_names(folders[1])}
    assert any(name.startswith("control_tiny_canny [") for name in r["model_list"])


def test_module_list_and_its_sliders_as_the_extension_gives_them(client):
    answer = client.get("/controlnet/module_list").json()
    assert set(answer) == {"module_list", "module_detail"}
    names = answer["module_list"]
    assert names[0] == "none" and "canny" in names and list(answer["module_detail"]) == names
    runnable = [n for n, info in detectors.MODULES.items() if not getattr(info, "needs_weights", False)]
    assert sorted(names) == sorted(runnable)  # only what plainsd runs
    canny = answer["module_detail"]["canny"]
    assert canny["model_free"] is False
    assert [s["name"] for s in canny["sliders"]][0] == "Resolution"
    assert [(s["value"], s["min"], s["max"]) for s in canny["sliders"]] == [(512, 64, 2048), (100, 1, 255), (200, 1, 255)]
    assert all(set(s) == {"name", "value", "min", "max", "step"} for d in answer["module_detail"].values()
               for s in d["sliders"])
    aliases = client.get("/controlnet/module_list?alias_names=true").json()
    labels = [getattr(detectors.MODULES[n], "label", n) for n in names]
    assert aliases["module_list"] == labels and list(aliases["module_detail"]) == labels


def test_detect_canny_gives_the_pixels_of_detectors_detect(client):
    image = square((96, 64), (20, 10, 60, 50))
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [b64png(image)],
                                                "controlnet_processor_res": 64, "controlnet_threshold_a": 50,
                                                "controlnet_threshold_b": 120})
    assert r.status_code == 200 and set(r.json()) == {"info", "images"} and r.json()["info"] == "Success"
    (got,) = [decode(b) for b in r.json()["images"]]
    want = detectors.detect("canny", image, 64, 50, 120)
    assert got.size == want.size and got.tobytes() == want.tobytes()
    assert np.asarray(got).max() == 255  # the square's edges are there
    # -1 (the extension's default for each field): the module's defaults
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [b64png(image)] * 2})
    want = detectors.detect("canny", image, 512, None, None)
    assert [decode(b).tobytes() for b in r.json()["images"]] == [want.tobytes()] * 2


@pytest.mark.parametrize("body, words", [
    ({"controlnet_module": "nope", "controlnet_input_images": ["x"]}, "controlnet_module: unknown preprocessor 'nope'"),
    ({"controlnet_module": "canny"}, "controlnet_input_images is empty"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["x"], "controlnet_masks": ["x"]}, "controlnet_masks:"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["%%"]}, "controlnet_input_images[0] is not valid base64"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["x"], "other": 1}, "unknown field other:"),
])
def test_detect_refusals(client, body, words):
    r = client.post("/controlnet/detect", json=body)
    assert r.status_code == 422 and words in r.json()["detail"], r.text


# --- generation: the units reach the pipeline, the detected maps come back -------------------------------------------

def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64), np.int16)


def test_a_txt2img_unit_reaches_the_pipeline_and_draws_what_the_python_call_draws(client, folders, name, monkeypatch):
    seen = []
    generate = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda engine, request, **kw: seen.append(request) or
                        generate(engine, request, **kw))
    body = {**BASE, "alwayson_scripts": {"controlnet": {"args": [unit(weight=0.8, control_mode=2)]}}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    (request,) = seen
    want = ControlUnit(name, SQUARE, "canny", weight=0.8, control_mode="ControlNet is more important")
    (got,) = request.controlnet
    assert got.image.tobytes() == SQUARE.tobytes() and replace(got, image=None) == replace(want, image=None)
    assert request.controlnet_dir == str(folders[1])
    # the picture: the Python call's with that unit, and not the one without it
    direct = pipeline.generate(client.app.state.store.get(), GenerationRequest(
        prompt=BASE["prompt"], steps=2, width=32, height=32, seed=1, sampler="Euler", controlnet=(want,),
        controlnet_dir=str(folders[1])))
    answer = r.json()
    assert np.abs(pixels(answer["images"][0]) - np.asarray(direct.images[0], np.int16)).max() <= 1
    plain = client.post("/sdapi/v1/txt2img", json=BASE).json()
    assert np.abs(pixels(answer["images"][0]) - pixels(plain["images"][0])).max() > 8
    # the infotext the pipeline writes reaches the answer
    info = json.loads(answer["info"])
    assert info["infotexts"][0] == direct.infotexts[0] and "ControlNet 0: " in info["infotexts"][0]
    assert info["extra_generation_params"]["ControlNet 0"].startswith("Module: canny, Model: " + name)


def test_detected_maps_follow_the_pictures_as_the_extension_appends_them(client):
    two = {"controlnet": {"args": [unit(), unit(module="invert", resize_mode="Just Resize")]}}
    answer = client.post("/sdapi/v1/txt2img", json={**BASE, "batch_size": 2, "alwayson_scripts": two}).json()
    assert len(answer["images"]) == 2 + 2 and len(json.loads(answer["info"])["infotexts"]) == 2
    canny = detectors.fit(detectors.detect("canny", SQUARE, 512), 32, 32, "Crop and Resize")
    inverted = detectors.fit(detectors.detect("invert", SQUARE), 32, 32, "Just Resize")
    assert [decode(b).tobytes() for b in answer["images"][2:]] == [canny.tobytes(), inverted.tobytes()]
    # save_detected_map false, or the setting control_net_no_detectmap: the pictures alone
    quiet = {"controlnet": {"args": [unit(save_detected_map=False), unit(module="invert")]}}
    answer = client.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": quiet}).json()
    assert len(answer["images"]) == 2
    answer = client.post("/sdapi/v1/txt2img", json={**BASE, "alwayson_scripts": two,
                                                    "override_settings": {"control_net_no_detectmap": True}}).json()
    assert len(answer["images"]) == 1
    # the hires fix: the second pass's map, then the first's
    hires = {**BASE, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "denoising_strength": 0.5}
    answer = client.post("/sdapi/v1/txt2img", json={**hires, "alwayson_scripts": {"controlnet": {"args": [unit()]}}})
    assert [decode(b).size for b in answer.json()["images"]] == [(48, 48), (48, 48), (32, 32)]


def test_an_img2img_unit_without_an_image_reads_the_init_image(client):
    init = square((40, 40), (5, 5, 20, 35))
    answer = client.post("/sdapi/v1/img2img", json={**BASE, "init_images": [b64png(init)], "resize_mode": 0,
                                                    "alwayson_scripts": {"controlnet": {"args": [unit(image=None)]}}})
    assert answer.status_code == 200, answer.text
    want = detectors.fit(detectors.detect("canny", init, 512), 32, 32, "Just Resize")  # img2img's resize mode 0
    assert decode(answer.json()["images"][-1]).tobytes() == want.tobytes()


@pytest.mark.parametrize("body", [
    {"alwayson_scripts": {"controlnet": {"args": [unit(resize_mode="Resize and Fill", pixel_perfect=True)]}}},
    # inpainting's "only masked": the unit's picture is cut to the mask's box first, as the pipeline cuts it
    {"init_images": [b64png(square((40, 40), (2, 2, 30, 36)))], "mask": b64png(square((40, 40), (20, 20, 36, 36))),
     "inpaint_full_res": True, "inpaint_full_res_padding": 2, "alwayson_scripts": {"controlnet": {"args": [unit()]}}},
])
def test_the_detected_map_is_the_hint_the_unet_got(client, monkeypatch, body):
    fitted = []
    hint_tensor = control.hint_tensor
    monkeypatch.setattr(control, "hint_tensor", lambda detected, w, h, resize: fitted.append(
        detectors.fit(detected, w, h, resize)) or hint_tensor(detected, w, h, resize))
    route = "img2img" if "init_images" in body else "txt2img"
    answer = client.post(f"/sdapi/v1/{route}", json={**BASE, **body})
    assert answer.status_code == 200, answer.text
    (got,) = fitted
    assert decode(answer.json()["images"][-1]).tobytes() == got.tobytes()


def test_a_t2i_adapter_is_listed_and_drives_a_unit_as_a_controlnet_does(client, folders):
    (title,) = [n for n in client.get("/controlnet/model_list").json()["model_list"] if n.startswith("t2iadapter_")]
    assert title == f"t2iadapter_tiny_canny [{control.model_hash(folders[1] / 't2iadapter_tiny_canny.safetensors')}]"
    body = {**BASE, "alwayson_scripts": {"controlnet": {"args": [unit(model="t2iadapter_tiny_canny")]}}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["extra_generation_params"]["ControlNet 0"].startswith(
        f"Module: canny, Model: {title}, ")
    plain = client.post("/sdapi/v1/txt2img", json=BASE).json()
    assert np.abs(pixels(r.json()["images"][0]) - pixels(plain["images"][0])).max() > 8
