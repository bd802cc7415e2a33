"""The field walk: every field of A1111's txt2img and img2img requests is honoured (a value other than the default
changes the picture or what the answer reports), or accepted only at the default and refused with 422 naming it.

The tables are facts read from A1111's modules/api/models.py (StableDiffusionTxt2ImgProcessingAPI and
StableDiffusionImg2ImgProcessingAPI: the __init__ parameters of modules/processing.py's StableDiffusionProcessing
and its txt2img / img2img subclasses, less API_NOT_ALLOWED, plus the API's own fields), with A1111's defaults. The
server's models must have exactly these fields, so a new A1111 field cannot slip in unclassified.
"""

import base64
import io
import json

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import plainsd
from plainsd.server import Limits, create_app
from plainsd.server.api import Img2ImgRequest, Txt2ImgRequest, generation_request

# A1111's StableDiffusionProcessing fields in its API models, with their defaults
A1111_SHARED = {
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": None, "tiling": None,
    "do_not_save_samples": False, "do_not_save_grid": False, "eta": None, "denoising_strength": None,
    "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None, "s_noise": None,
    "override_settings": None, "override_settings_restore_afterwards": True, "refiner_checkpoint": None,
    "refiner_switch_at": None, "disable_extra_networks": False, "firstpass_image": None, "comments": None,
    # the API's own additions (models.py)
    "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True, "save_images": False,
    "alwayson_scripts": {}, "force_task_id": None, "infotext": None,
}
A1111_TXT2IMG = {
    **A1111_SHARED, "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0,
    "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "",
}
A1111_IMG2IMG = {
    **A1111_SHARED, "init_images": None, "resize_mode": 0, "denoising_strength": 0.75, "image_cfg_scale": None,
    "mask": None, "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0,
    "inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
    "initial_noise_multiplier": None, "latent_mask": None, "include_init_images": False,
}
# plainsd's own fields (A1111 clients never send them)
PLAINSD_OWN = {"fast": False, "tiny_decoder": False, "guidance_until": None}

# Default-only fields: a value asking for something plainsd does not do, which must be refused with 422 naming it
DEFAULT_ONLY = {
    "restore_faces": True,
    "firstpass_image": "iVBORw0KGgo=", "hr_checkpoint_name": "other.safetensors", "force_task_id": "task(1)",
    "comments": {"note": "x"}, "image_cfg_scale": 1.5,
}

BASE = {"prompt": "a red circle", "steps": 2, "width": 32, "height": 32, "seed": 1, "sampler_name": "Euler",
        "cfg_scale": 5}


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


INIT = b64png(Image.new("RGB", (32, 32), (200, 30, 30)))
WIDE_INIT = b64png(Image.radial_gradient("L").convert("RGB").resize((64, 32)))
RIGHT_HALF = Image.new("L", (32, 32), 0)
RIGHT_HALF.paste(255, (16, 0, 32, 32))
MASK = b64png(RIGHT_HALF)
GREY_MASK = b64png(Image.new("L", (32, 32), 110))
CORNER = Image.new("L", (32, 32), 0)
CORNER.paste(255, (20, 20, 28, 28))  # "only masked" draws this box alone (the right half's box is the whole picture)
IMG2IMG = {"init_images": [INIT], "denoising_strength": 0.75}
INPAINT = {**IMG2IMG, "mask": MASK}


class Change:
    """A field honoured: `values` on top of BASE (+ `base`) must change the answer. `expect` says how (given the
    changed answer and the unchanged one); by default the pictures must differ."""

    def __init__(self, values: dict, base: dict | None = None, expect=None, route: str = "txt2img"):
        self.values, self.base, self.expect, self.route = values, base or {}, expect, route

    def run(self, client, name: str):
        if self.route == "img2img" and not self.base.get("init_images"):
            self.base = {**IMG2IMG, **self.base}
        plain = _answer(client, self.route, {**BASE, **self.base})
        changed = client.post(f"/sdapi/v1/{self.route}", json={**BASE, **self.base, **self.values})
        assert changed.status_code == 200, f"{name}: {changed.text}"
        if self.expect is None:
            assert pixels(changed.json()) != pixels(plain), f"{name} did not change the picture"
        else:
            assert self.expect(changed.json(), plain), f"{name}: {self.values} did not do what it should"


_ANSWERS = {}


def _answer(client, route: str, body: dict) -> dict:
    """The answer to an unchanged request (the same for many fields' checks: asked once)."""
    key = (route, json.dumps(body, sort_keys=True))
    if key not in _ANSWERS:
        r = client.post(f"/sdapi/v1/{route}", json=body)
        assert r.status_code == 200, r.text
        _ANSWERS[key] = r.json()
    return _ANSWERS[key]


class Unknown(Change):
    """A field honoured by looking a name up: an unknown name must be refused with 422 and these words."""

    def __init__(self, values: dict, words: str):
        super().__init__(values)
        self.words = words

    def run(self, client, name: str):
        r = client.post("/sdapi/v1/txt2img", json={**BASE, **self.values})
        assert r.status_code == 422 and self.words in r.json()["detail"], f"{name}: {r.text}"


def infotext(answer) -> str:
    return json.loads(answer["info"])["infotexts"][0]


def sizes(answer) -> list:
    return [Image.open(io.BytesIO(base64.b64decode(b))).size for b in answer["images"]]


def pixels(answer) -> list:
    """The pictures' pixels (their PNGs also hold the infotext, which may differ when the pixels do not)."""
    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB").tobytes() for b in answer["images"]]


# (4 second-pass steps at strength 0.5 are 2: with 1, every schedule and sampler would take the same last step)
HIRES = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "denoising_strength": 0.5,
         "hr_second_pass_steps": 4}

HONOURED = {
    "prompt": Change({"prompt": "a blue square"}),
    "negative_prompt": Change({"negative_prompt": "red"}),
    "styles": Unknown({"styles": ["no such style"]}, "no such style"),
    "seed": Change({"seed": 2}),
    "subseed": Change({"subseed": 7}, base={"subseed_strength": 0.5}),
    "subseed_strength": Change({"subseed_strength": 0.5}, base={"subseed": 7}),
    "seed_resize_from_w": Change({"seed_resize_from_w": 64}, base={"seed_resize_from_w": 48, "seed_resize_from_h": 48}),
    "seed_resize_from_h": Change({"seed_resize_from_h": 64}, base={"seed_resize_from_w": 48, "seed_resize_from_h": 48}),
    "sampler_name": Change({"sampler_name": "Euler a"}),
    "sampler_index": Change({"sampler_index": "Euler a"}, base={"sampler_name": None},
                            expect=lambda a, b: "Sampler: Euler a" in infotext(a) and pixels(a) != pixels(b)),
    "scheduler": Change({"scheduler": "Karras"}, base={"steps": 3}, expect=lambda a, b: "Schedule type: Karras" in infotext(a)
                        and pixels(a) != pixels(b)),
    "batch_size": Change({"batch_size": 2}, expect=lambda a, b: json.loads(a["info"])["all_seeds"] == [1, 2]),
    "n_iter": Change({"n_iter": 2}, expect=lambda a, b: len(a["images"]) == 2 and pixels(a)[0] == pixels(b)[0]),
    "steps": Change({"steps": 3}),
    "cfg_scale": Change({"cfg_scale": 9}),
    "width": Change({"width": 40}, expect=lambda a, b: sizes(a) == [(40, 32)]),
    "height": Change({"height": 40}, expect=lambda a, b: sizes(a) == [(32, 40)]),
    "tiling": Change({"tiling": True}),
    # A1111's API sets these from save_images: they change no picture (test_save_images... checks the files)
    "do_not_save_samples": Change({"do_not_save_samples": True}, expect=lambda a, b: pixels(a) == pixels(b)),
    "do_not_save_grid": Change({"do_not_save_grid": True}, expect=lambda a, b: pixels(a) == pixels(b)),
    "eta": Change({"eta": 0.5}, base={"sampler_name": "Euler a"}),
    "s_churn": Change({"s_churn": 1.0}),
    "s_tmin": Change({"s_tmin": 5.0}, base={"s_churn": 1.0}),
    "s_tmax": Change({"s_tmax": 0.5}, base={"s_churn": 1.0}),
    "s_noise": Change({"s_noise": 0.5}, base={"sampler_name": "Euler a"}),
    # (the request's own fields win over the infotext's: its prompt, steps and seed stay)
    "infotext": Change({"infotext": "a blue square\nSteps: 9, Seed: 5, RNG: NV, Variation seed: 7, Variation seed "
                                    "strength: 0.5, Version: v1.10.1"},
                       expect=lambda a, b: infotext(a).startswith("a red circle\nSteps: 2,") and "Seed: 1," in infotext(a)
                       and "Variation seed: 7, Variation seed strength: 0.5" in infotext(a) and "RNG: NV" in infotext(a)
                       and pixels(a) != pixels(b)),
    "s_min_uncond": Change({"s_min_uncond": 100.0}, base={"steps": 4},
                           expect=lambda a, b: "NGMS: 100" in infotext(a) and pixels(a) != pixels(b)),
    "override_settings": Change({"override_settings": {"token_merging_ratio": 0.5}}),
    "disable_extra_networks": Change({"disable_extra_networks": True, "prompt": "a red circle <lora:absent:1>"},
                                     expect=lambda a, b: pixels(a) == pixels(b)),
    "script_name": Unknown({"script_name": "no such script"}, "no such script"),
    "script_args": Unknown({"script_args": [1]}, "script_args"),  # arguments for no script
    "send_images": Change({"send_images": False}, expect=lambda a, b: a["images"] == [] and len(b["images"]) == 1),
    "fast": Change({"fast": True}, base={"steps": 6}),
    "guidance_until": Change({"guidance_until": 0.5}, base={"steps": 6}),
    # A1111's refiner: any of the server's models with the same latents (here a second tiny one), by name
    "refiner_checkpoint": Change({"refiner_checkpoint": "tiny_refiner", "refiner_switch_at": 0.5}, base={"steps": 8},
                                 expect=lambda a, b: "Model: tiny, Refiner: tiny_refiner, Refiner switch at: 0.5" in infotext(a)
                                 and pixels(a) != pixels(b)),
    "refiner_switch_at": Change({"refiner_switch_at": 0.3}, base={"steps": 8, "refiner_checkpoint": "tiny_refiner",
                                                                   "refiner_switch_at": 0.6}),
    # txt2img's hires fix
    "enable_hr": Change({"enable_hr": True}, expect=lambda a, b: sizes(a) == [(64, 64)]),
    "denoising_strength": Change({"denoising_strength": 0.8}, base=HIRES),
    "firstphase_width": Change({"firstphase_width": 16, "firstphase_height": 16}, base=HIRES,
                               expect=lambda a, b: json.loads(a["info"])["width"] == 16 and sizes(a) == [(32, 32)]),
    "hr_scale": Change({"hr_scale": 2}, base=HIRES, expect=lambda a, b: sizes(a) == [(64, 64)]),
    "hr_upscaler": Change({"hr_upscaler": "Latent"}, base=HIRES),
    "hr_second_pass_steps": Change({"hr_second_pass_steps": 6}, base=HIRES),
    "hr_resize_x": Change({"hr_resize_x": 40}, base=HIRES, expect=lambda a, b: sizes(a) == [(40, 40)]),
    "hr_sampler_name": Change({"hr_sampler_name": "Euler a"}, base=HIRES),
    "hr_scheduler": Change({"hr_scheduler": "Karras"}, base=HIRES),
    "hr_prompt": Change({"hr_prompt": "a blue square"}, base=HIRES),
    "hr_negative_prompt": Change({"hr_negative_prompt": "red"}, base=HIRES),
    # img2img
    "init_images": Change({"init_images": [WIDE_INIT]}, route="img2img"),
    "resize_mode": Change({"resize_mode": 1}, base={"init_images": [WIDE_INIT]}, route="img2img"),
    "mask": Change({"mask": MASK}, route="img2img"),
    "mask_blur": Change({"mask_blur": 0}, base=INPAINT, route="img2img"),
    "mask_blur_x": Change({"mask_blur_x": 0, "mask_blur_y": 0}, base=INPAINT, route="img2img"),
    "inpainting_mask_invert": Change({"inpainting_mask_invert": 1}, base=INPAINT, route="img2img"),
    "include_init_images": Change({"include_init_images": True}, route="img2img",
                                  expect=lambda a, b: len(a["images"]) == 2 and a["parameters"]["init_images"]),
    "inpainting_fill": Change({"inpainting_fill": 2}, base=INPAINT, route="img2img"),
    "inpaint_full_res": Change({"inpaint_full_res": False}, base={**INPAINT, "mask": b64png(CORNER)}, route="img2img"),
    "inpaint_full_res_padding": Change({"inpaint_full_res_padding": 8}, base={**INPAINT, "mask": b64png(CORNER)},
                                       route="img2img"),
    "mask_round": Change({"mask_round": False}, base={**INPAINT, "mask": GREY_MASK}, route="img2img"),
    "initial_noise_multiplier": Change({"initial_noise_multiplier": 0.5}, route="img2img"),
    "latent_mask": Change({"latent_mask": b64png(RIGHT_HALF.rotate(90))}, base={**INPAINT, "inpaint_full_res": False},
                          route="img2img"),
}
# fields whose check is a test of its own below (it needs more than one request, or the server's files)
HONOURED_ELSEWHERE = {"override_settings_restore_afterwards", "save_images", "tiny_decoder", "hr_resize_y",
                      "mask_blur_y", "firstphase_height",  # (firstphase_height: with firstphase_width above)
                      "alwayson_scripts"}  # (the ControlNet extension's units: test_controlnet.py, field by field)
# denoising_strength is honoured in both: the hires fix's (above), and img2img's
IMG2IMG_STRENGTH = Change({"denoising_strength": 0.3}, route="img2img")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def client(tmp_path_factory, outputs):
    folder = tmp_path_factory.mktemp("models")
    plainsd.save(plainsd.build("tiny", seed=0), folder / "tiny.safetensors")
    plainsd.save(plainsd.build("tiny", seed=1), folder / "tiny_refiner.safetensors")  # (sorted after the base)
    app = create_app(models_dir=folder, outputs=outputs, limits=Limits(max_size=256, max_steps=30, max_images=4))
    with TestClient(app) as c:
        yield c


def test_the_server_has_exactly_a1111s_fields_with_its_defaults():
    for model, a1111 in ((Txt2ImgRequest, A1111_TXT2IMG), (Img2ImgRequest, A1111_IMG2IMG)):
        ours = {name: field.get_default(call_default_factory=True) for name, field in model.model_fields.items()}
        assert set(ours) - set(PLAINSD_OWN) == set(a1111), model.__name__
        assert {name: ours[name] for name in a1111} == a1111
        assert {name: ours[name] for name in PLAINSD_OWN} == PLAINSD_OWN


def test_every_field_is_classified_once():
    fields = set(A1111_TXT2IMG) | set(A1111_IMG2IMG) | set(PLAINSD_OWN)
    honoured = set(HONOURED) | HONOURED_ELSEWHERE
    assert honoured | set(DEFAULT_ONLY) == fields
    assert not honoured & set(DEFAULT_ONLY)


@pytest.mark.parametrize("route, a1111, extra", [("txt2img", A1111_TXT2IMG, {}), ("img2img", A1111_IMG2IMG, IMG2IMG)])
def test_every_default_sent_explicitly_is_accepted(client, route, a1111, extra):
    body = {**a1111, **BASE, **extra, "steps": 1}
    r = client.post(f"/sdapi/v1/{route}", json=body)
    assert r.status_code == 200, r.text
    dropped = {"init_images": None, "mask": None} if route == "img2img" else {}  # A1111 leaves them out
    assert r.json()["parameters"] == {**a1111, **PLAINSD_OWN, **body, **dropped}


@pytest.mark.parametrize("name", sorted(DEFAULT_ONLY))
def test_default_only_fields_are_refused_naming_the_field(client, name):
    route = "img2img" if name not in A1111_TXT2IMG else "txt2img"
    extra = IMG2IMG if route == "img2img" else {}
    r = client.post(f"/sdapi/v1/{route}", json={**BASE, **extra, name: DEFAULT_ONLY[name]})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(name) and r.json()["detail"].count(". ") == 0


@pytest.mark.parametrize("name", sorted(HONOURED))
def test_honoured_fields_change_the_answer(client, name):
    HONOURED[name].run(client, name)


def test_img2img_denoising_strength_changes_the_picture(client):
    IMG2IMG_STRENGTH.run(client, "denoising_strength")


def test_hires_resize_y_and_mask_blur_y(client):
    Change({"hr_resize_y": 48}, base=HIRES, expect=lambda a, b: sizes(a) == [(48, 48)]).run(client, "hr_resize_y")
    r = client.post("/sdapi/v1/img2img", json={**BASE, **INPAINT, "mask_blur_y": 0})
    assert r.status_code == 422 and r.json()["detail"].startswith("mask_blur_x and mask_blur_y differ (4, 0);")


def test_save_images_writes_the_pictures_with_their_parameters(client, outputs):
    before = set(outputs.iterdir())
    answer = client.post("/sdapi/v1/txt2img", json={**BASE, "save_images": True}).json()
    written = sorted(set(outputs.iterdir()) - before)
    assert len(written) == 1 and Image.open(written[0]).info["parameters"] == infotext(answer)
    client.post("/sdapi/v1/txt2img", json={**BASE, "do_not_save_samples": True})
    assert len(set(outputs.iterdir()) - before) == 1  # nothing more written
    r = client.post("/sdapi/v1/txt2img", json={**BASE, "save_images": True, "do_not_save_samples": True})
    assert r.status_code == 422 and "contradict" in r.json()["detail"]


def test_override_settings_restore_afterwards(client):
    override = {"override_settings": {"token_merging_ratio": 0.3}}
    client.post("/sdapi/v1/txt2img", json={**BASE, **override})
    assert client.get("/sdapi/v1/options").json()["token_merging_ratio"] == 0.0
    client.post("/sdapi/v1/txt2img", json={**BASE, **override, "override_settings_restore_afterwards": False})
    try:
        assert client.get("/sdapi/v1/options").json()["token_merging_ratio"] == 0.3
    finally:
        client.post("/sdapi/v1/options", json={"token_merging_ratio": 0.0})


def test_tiny_decoder_asks_for_the_models_tiny_decoder():
    request = generation_request(Txt2ImgRequest(tiny_decoder=True), "txt2img", Limits(), {})
    assert request.fast.tiny_decoder and not generation_request(Txt2ImgRequest(), "txt2img", Limits(), {}).fast


def test_override_settings_plainsd_does_not_act_on_are_refused_unless_unchanged(client):
    options = client.get("/sdapi/v1/options").json()
    same = {"sd_vae": options["sd_vae"], "samples_format": options["samples_format"]}
    assert client.post("/sdapi/v1/txt2img", json={**BASE, "override_settings": same}).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={**BASE, "override_settings": {"samples_format": "jpg", "x": 1}})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("override_settings: plainsd does not act on samples_format, x; it takes "
                                         "sd_model_checkpoint, sd_vae, sd_checkpoints_limit, CLIP_stop_at_last_layers, "
                                         "token_merging_ratio,")
    # /sdapi/v1/options alike; what a client read back from it is accepted as it is
    assert client.post("/sdapi/v1/options", json=options).status_code == 200
    r = client.post("/sdapi/v1/options", json={"show_progressbar": False})
    assert r.status_code == 422 and r.json()["detail"].startswith("options: plainsd does not act on show_progressbar;")
    assert "show_progressbar" not in client.get("/sdapi/v1/options").json()


def test_several_init_images_are_refused(client):
    r = client.post("/sdapi/v1/img2img", json={**BASE, "init_images": [INIT, INIT]})
    assert r.status_code == 422 and r.json()["detail"].startswith("init_images holds 2 images;")
