"""The A1111 API in-process: fields, defaults, answers, validation, models, auth, queue limits."""

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

import plainsd
from plainsd import lora, pipeline
from plainsd.pnginfo import parse_infotext

from fastapi.testclient import TestClient  # the serve extra is part of the test extras

from plainsd.server import Limits, create_app


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    plainsd.save(plainsd.build("tiny", seed=0), folder / "alpha.safetensors")
    (folder / "sub").mkdir()
    plainsd.save(plainsd.build("tiny", seed=1), folder / "sub" / "beta.safetensors")
    (folder / "notes.txt").write_text("not a model")
    return folder


@pytest.fixture(scope="module")
def client(models_dir):
    app = create_app(models_dir=models_dir, limits=Limits(max_size=256, max_steps=30, max_images=4))
    with TestClient(app) as c:
        yield c


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_answer_has_a1111_shape(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "negative_prompt": "blue", "steps": 3,
                                               "width": 64, "height": 48, "seed": 5, "batch_size": 2,
                                               "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    assert isinstance(body["info"], str)
    info = json.loads(body["info"])
    assert info["all_seeds"] == [5, 6] and info["seed"] == 5
    assert info["width"] == 64 and info["height"] == 48 and info["sampler_name"] == "DPM++ 2M"
    assert info["sd_model_name"] == "alpha" and len(info["sd_model_hash"]) == 10
    images = [decode(b) for b in body["images"]]
    assert [im.size for im in images] == [(64, 48)] * 2
    fields = parse_infotext(images[1].info["parameters"])
    assert fields["Prompt"] == "a red circle" and fields["Negative prompt"] == "blue"
    assert fields["Seed"] == "6" and fields["Schedule type"] == "Karras" and fields["CFG scale"] == "5"
    assert fields["Model"] == "alpha" and fields["Model hash"] == info["sd_model_hash"]
    # parameters echoes the request with A1111's defaults filled in
    assert body["parameters"]["prompt"] == "a red circle" and body["parameters"]["n_iter"] == 1
    assert body["parameters"]["restore_faces"] is None and body["parameters"]["send_images"] is True


def test_same_seed_same_image_and_defaults(client):
    req = {"prompt": "x", "steps": 2, "width": 32, "height": 32, "seed": 7}
    a = client.post("/sdapi/v1/txt2img", json=req).json()
    b = client.post("/sdapi/v1/txt2img", json=req).json()
    assert a["images"] == b["images"]
    p = a["parameters"]
    # A1111's API defaults for fields the client left out
    assert (p["cfg_scale"], p["sampler_index"], p["batch_size"], p["n_iter"], p["subseed"]) == (7.0, "Euler", 1, 1, -1)
    assert json.loads(a["info"])["sampler_name"] == "Euler"


def test_unknown_fields_and_unsupported_features_are_refused(client):
    plain = {"prompt": "x", "steps": 2, "width": 32, "height": 32, "restore_faces": False, "tiling": False,
             "enable_hr": False, "alwayson_scripts": {}, "sampler_name": "Euler a", "scheduler": "automatic",
             "send_images": False}
    r = client.post("/sdapi/v1/txt2img", json=plain)
    assert r.status_code == 200, r.text
    assert r.json()["images"] == [] and r.json()["parameters"]["restore_faces"] is False
    r = client.post("/sdapi/v1/txt2img", json={**plain, "some_future_field": 3, "other": None})
    assert r.status_code == 422 and r.json()["detail"].startswith("unknown fields some_future_field, other: ")
    assert r.json()["errors"][0]["loc"] == ["body", "some_future_field"]
    r = client.post("/sdapi/v1/img2img", json={**plain, "init_images": [b64png(Image.new("RGB", (32, 32)))]})
    assert r.status_code == 422 and "unknown field enable_hr" in r.json()["detail"]  # A1111's img2img has no hires fix
    r = client.post("/sdapi/v1/txt2img", json={**plain, "restore_faces": True})
    assert r.status_code == 422
    assert r.json()["detail"] == ("restore_faces: plainsd has no face restoration, so only null or false is accepted "
                                  "here, got true")
    r = client.post("/sdapi/v1/txt2img", json={**plain, "alwayson_scripts": {"controlnet": {"args": []}, "ADetailer": {}}})
    assert r.status_code == 422 and r.json()["detail"].startswith("alwayson_scripts asks for ADetailer; plainsd has only")


@pytest.mark.parametrize("body, words", [
    ({"width": 65}, "width should be a multiple of 8, got 65"),
    ({"width": 512}, "width and height must be between 8 and 256, got 512x32"),
    ({"steps": 0}, "steps should be greater than or equal to 1, got 0"),
    ({"steps": 31}, "steps may be at most 30, got 31"),
    ({"batch_size": 3, "n_iter": 2}, "at most 4 images"),
    ({"sampler_name": "Nope"}, 'sampler_name: unknown sampler "Nope"; /sdapi/v1/samplers lists the names'),
    ({"sampler_name": "euler a"}, "unknown sampler"),  # A1111's API takes its names as it lists them
    ({"scheduler": "wobbly"}, "scheduler should be '', 'Automatic', 'Uniform', 'Karras'"),
    ({"seed": -5}, "seed should be greater than or equal to -1, got -5"),
    ({"seed": 2**32}, "seed should be less than or equal to 4294967295, got 4294967296"),
    ({"cfg_scale": 101}, "cfg_scale should be less than or equal to 100, got 101"),
    ({"width": "wide"}, 'width should be a valid integer, unable to parse string as an integer, got "wide"'),
    ({"steps": None}, "steps should be a valid integer, got null"),
    ({"subseed": -5}, "subseed should be greater than or equal to -1, got -5"),
    ({"subseed_strength": 2}, "subseed_strength should be less than or equal to 1, got 2"),
    ({"seed_resize_from_w": 64}, "seed_resize_from_w and seed_resize_from_h must both be multiples of 8"),
    ({"seed_resize_from_w": 512, "seed_resize_from_h": 512}, "seed_resize_from_w and seed_resize_from_h may be at most 256"),
    ({"sampler_name": "DPM++ 2M", "s_churn": 1}, "s_churn is for the samplers Euler, Heun, DPM2; DPM++ 2M does not"),
    ({"sampler_name": "LMS", "eta": 0.5}, "eta is for the samplers"),
    ({"sampler_name": "Euler", "s_noise": -1}, "s_noise should be greater than or equal to 0, got -1"),
    ({"override_settings": {"tiling": "yes"}}, "the tiling setting must be true or false, got 'yes'"),
    ({"override_settings": {"eta_noise_seed_delta": "x"}}, "eta_noise_seed_delta must be a whole number, got 'x'"),
    ({"override_settings": {"randn_source": "cuda"}}, "randn_source (the random number source) must be one of GPU, "
                                                      "CPU, NV, got 'cuda'"),
    ({"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "unknown model"),
    ({"prompt": "a <lora:style:1> circle"}, "LoRA"),
    ({"tiny_decoder": True}, "this model has no tiny decoder"),
    ({"guidance_until": 0}, "guidance_until should be greater than 0, got 0"),
    ({"override_settings": {"token_merging_ratio": 1.5}}, "token_merging_ratio must be at least 0 and below 1"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "unknown hires upscaler 'R-ESRGAN 4x+'; plainsd has Latent, "),
    ({"enable_hr": True, "hr_scale": 8.5}, "hr_scale should be less than or equal to 8, got 8.5"),
    ({"width": 64, "enable_hr": True, "hr_scale": 8}, "the hires fix would draw 512x256 from 64x32; width and height may be at most 256"),
    ({"enable_hr": True, "hr_scale": 0.5}, "hr_scale should be greater than or equal to 1, got 0.5"),
    ({"enable_hr": True, "hr_resize_x": 100}, "hr_resize_x should be a multiple of 8, got 100"),
    ({"enable_hr": True, "hr_resize_x": 264}, "the hires fix would draw 264x264 from 32x32; width and height may be at most 256"),
    ({"enable_hr": True, "hr_sampler_name": "Nope"}, 'hr_sampler_name: unknown sampler "Nope"'),
    ({"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}, "both passes with the same model"),
    ({"enable_hr": True, "denoising_strength": 1.5}, "denoising_strength should be less than or equal to 1, got 1.5"),
    ({"override_settings": {"sd_vae": "other.pt"}}, "sd_vae: unknown VAE 'other.pt'; sd_vae takes Automatic, None"),
    ({"override_settings": {"sd_checkpoints_limit": 0}}, "sd_checkpoints_limit must be a whole number from 1 to 10, got 0"),
    ({"sampler_name": "Euler", "sampler_index": "Euler a"}, "name different samplers; send sampler_name alone"),
    ("not a dict", "the request body should be a valid dictionary"),
])
def test_bad_requests_get_422_with_one_clear_sentence(client, body, words):
    r = client.post("/sdapi/v1/txt2img", json={"steps": 2, "width": 32, "height": 32, **body} if isinstance(body, dict) else body)
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"]


def test_img2img_keeps_the_init_image_at_strength_zero_and_inpaints(client):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    r = client.post("/sdapi/v1/img2img", json={"init_images": [b64png(init)], "prompt": "x", "steps": 4,
                                               "width": 64, "height": 64, "denoising_strength": 0.5, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["init_images"] is None  # A1111 leaves them out of the echo
    assert json.loads(body["info"])["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in decode(body["images"][0]).info["parameters"]
    # inpainting: the unmasked half stays exactly as it was (the result is pasted through the mask)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))
    r = client.post("/sdapi/v1/img2img", json={"init_images": ["data:image/png;base64," + b64png(init)],
                                               "mask": b64png(mask), "mask_blur": 0, "prompt": "x", "steps": 4,
                                               "width": 64, "height": 64, "denoising_strength": 1.0,
                                               "include_init_images": True})
    assert r.status_code == 200, r.text
    out = decode(r.json()["images"][0]).convert("RGB")
    assert len(r.json()["images"]) == 2  # the result, then the init image
    left = [out.getpixel((x, y)) for x in range(0, 28) for y in range(64)]
    assert all(p == (200, 30, 30) for p in left)


def test_inpainting_fields_with_a1111s_defaults(client):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (70, 10, 80, 20))
    body = {"init_images": [b64png(init)], "mask": b64png(mask), "mask_blur": 1, "prompt": "x", "steps": 2,
            "width": 32, "height": 32, "seed": 1}
    r = client.post("/sdapi/v1/img2img", json=body)  # A1111's API: only masked, padding 0, masked content fill
    assert r.status_code == 200, r.text
    out = decode(r.json()["images"][0])
    fields = parse_infotext(out.info["parameters"])
    assert (fields["Inpaint area"], fields["Masked area padding"], fields["Masked content"]) == ("Only masked", "0",
                                                                                                 "fill")
    assert out.size == (96, 64) and np.array_equal(np.asarray(out.convert("RGB"))[:, :48], np.asarray(init)[:, :48])
    r = client.post("/sdapi/v1/img2img", json={**body, "inpaint_full_res": False, "inpainting_fill": 3,
                                               "mask_round": False, "initial_noise_multiplier": 0.8})
    assert r.status_code == 200, r.text
    out = decode(r.json()["images"][0])
    fields = parse_infotext(out.info["parameters"])
    assert out.size == (32, 32) and "Inpaint area" not in fields
    assert (fields["Masked content"], fields["Noise multiplier"]) == ("latent nothing", "0.8")
    r = client.post("/sdapi/v1/img2img", json={**body, "override_settings": {"initial_noise_multiplier": 0.7}})
    assert "Noise multiplier: 0.7" in decode(r.json()["images"][0]).info["parameters"]  # A1111's setting
    for change, words in [({"inpainting_fill": 5}, "inpainting_fill must be 0 (fill), 1 (original)"),
                          ({"inpaint_full_res_padding": 999}, "from 0 to 256"),
                          ({"initial_noise_multiplier": -1}, "between 0 and 1.5"),
                          ({"mask": None, "latent_mask": b64png(mask)}, "latent_mask needs a mask"),
                          ({"override_settings": {"initial_noise_multiplier": "high"}}, "must be a number")]:
        r = client.post("/sdapi/v1/img2img", json={**body, **change})
        assert r.status_code == 422 and words in r.json()["detail"], r.text


@pytest.mark.parametrize("image, words", [
    ("not base64!!", "not valid base64"),
    (base64.b64encode(b"hello, not an image").decode(), "not an image"),
    (None, "init_images must hold"),
])
def test_bad_images_are_refused(client, image, words):
    body = {"prompt": "x", "steps": 2, "width": 32, "height": 32}
    if image is not None:
        body["init_images"] = [image]
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422 and words in r.json()["detail"], r.text


def test_image_pixel_limit_is_checked_before_decoding(models_dir):
    app = create_app(models_dir=models_dir, limits=Limits(max_image_pixels=100 * 100))
    with TestClient(app) as c:
        big = b64png(Image.new("RGB", (200, 200)))
        r = c.post("/sdapi/v1/img2img", json={"init_images": [big], "steps": 2, "width": 32, "height": 32})
    assert r.status_code == 422 and "at most 10000 pixels" in r.json()["detail"]


def test_lists(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    names = [s["name"] for s in samplers]
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC", "LCM"} <= set(names)
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = client.get("/sdapi/v1/schedulers").json()
    assert {"automatic", "karras", "exponential"} <= {s["name"] for s in schedulers}
    assert {"Karras", "Automatic"} <= {s["label"] for s in schedulers}
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["alpha", "sub/beta"]
    assert all(set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"} for m in models)
    assert models[0]["title"] == f"alpha.safetensors [{models[0]['hash']}]"
    assert models[0]["sha256"].startswith(models[0]["hash"]) and len(models[0]["sha256"]) == 64


def test_options_switch_models_only_among_those_found(client):
    models = client.get("/sdapi/v1/sd-models").json()
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == models[0]["title"]
    # the settings a request's fields default to, at A1111's defaults, so a client can read them
    assert {k: options[k] for k in ("eta_ancestral", "eta_ddim", "s_churn", "s_tmin", "s_tmax", "s_noise", "tiling",
                                    "initial_noise_multiplier", "eta_noise_seed_delta", "randn_source")} == \
        {"eta_ancestral": 1.0, "eta_ddim": 0.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0,
         "tiling": False, "initial_noise_multiplier": 1.0, "eta_noise_seed_delta": 0, "randn_source": "GPU"}
    req = {"prompt": "x", "steps": 2, "width": 32, "height": 32, "seed": 3}
    first = client.post("/sdapi/v1/txt2img", json=req).json()
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models[1]["title"]}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[1]["title"]
    second = client.post("/sdapi/v1/txt2img", json=req).json()
    assert json.loads(second["info"])["sd_model_name"] == "beta"
    assert second["images"] != first["images"]
    for bad in ["../alpha.safetensors", "/etc/passwd", "notes.txt", "gamma"]:
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": bad})
        assert r.status_code == 422 and "unknown model" in r.json()["detail"]
    # per-request override, restored afterwards (A1111's default)
    r = client.post("/sdapi/v1/txt2img", json={**req, "override_settings": {"sd_model_checkpoint": "alpha"}}).json()
    assert r["images"] == first["images"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[1]["title"]
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "alpha"})


def test_png_info_reads_back_parameters(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a (red:1.2) circle", "steps": 2, "width": 32,
                                               "height": 32, "seed": 9})
    info = client.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]}).json()
    assert set(info) == {"info", "items", "parameters"}
    assert info["info"].startswith("a (red:1.2) circle\n")
    assert info["parameters"]["Seed"] == "9" and info["parameters"]["Prompt"] == "a (red:1.2) circle"
    assert client.post("/sdapi/v1/png-info", json={"image": "@@"}).status_code == 422


def test_progress_interrupt_and_skip_while_running(models_dir):
    app = create_app(models_dir=models_dir)
    seen = []
    with TestClient(app) as c:
        def watch():
            for _ in range(400):
                p = c.get("/sdapi/v1/progress").json()
                if p["state"]["sampling_step"] >= 2:
                    seen.append(p)
                    c.post("/sdapi/v1/interrupt")
                    return
                time.sleep(0.01)
        t = threading.Thread(target=watch)
        t.start()
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 150, "width": 64, "height": 64, "n_iter": 3})
        t.join()
        assert r.status_code == 200
        info = json.loads(r.json()["info"])
        assert info["interrupted"] and len(r.json()["images"]) == 1  # stopped in the first batch, returned what it had
        p = seen[0]
        assert 0 < p["progress"] < 0.5 and p["state"]["job"] == "txt2img" and p["state"]["sampling_steps"] == 150
        assert p["current_image"] and decode(p["current_image"]).size[0] > 0
        assert c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0

        def skipper():
            for _ in range(400):
                if c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 2:
                    c.post("/sdapi/v1/skip")
                    return
                time.sleep(0.01)
        req = {"prompt": "x", "steps": 100, "width": 64, "height": 64, "n_iter": 2, "seed": 1}
        full = c.post("/sdapi/v1/txt2img", json=req).json()["images"]
        t = threading.Thread(target=skipper)
        t.start()
        r = c.post("/sdapi/v1/txt2img", json=req)
        t.join()
        info = json.loads(r.json()["info"])
        assert not info["interrupted"] and info["all_seeds"] == [1, 2]
        images = r.json()["images"]
        assert images[0] != full[0] and images[1] == full[1]  # the first batch was cut short, the second ran whole


def test_queue_is_bounded(models_dir):
    app = create_app(models_dir=models_dir, max_queue=1)
    results = []
    with TestClient(app) as c:
        def post(steps):
            results.append(c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": steps, "width": 64, "height": 64}))
        first = threading.Thread(target=post, args=(150,))
        first.start()
        for _ in range(400):  # wait until the first job runs
            if c.get("/sdapi/v1/progress").json()["state"]["job"]:
                break
            time.sleep(0.01)
        second = threading.Thread(target=post, args=(2,))
        second.start()
        for _ in range(400):  # ... and the second waits
            if c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2:
                break
            time.sleep(0.01)
        third = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32, "height": 32})
        assert third.status_code == 503 and "queue is full" in third.json()["detail"]
        assert third.headers["Retry-After"].isdigit()
        c.post("/sdapi/v1/interrupt")
        first.join()
        second.join()
    assert sorted(r.status_code for r in results) == [200, 200]


def test_basic_auth_on_every_route(models_dir):
    app = create_app(models_dir=models_dir, auth="ann:secret,bob:pw")
    with TestClient(app) as c:
        for path in ["/", "/sdapi/v1/samplers", "/sdapi/v1/sd-models", "/docs"]:
            assert c.get(path).status_code == 401
        assert c.get("/sdapi/v1/samplers", auth=("ann", "wrong")).status_code == 401
        assert c.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 8, "height": 8}).status_code == 401
        assert c.get("/sdapi/v1/samplers", auth=("ann", "secret")).status_code == 200
        assert c.get("/sdapi/v1/samplers", auth=("bob", "pw")).status_code == 200
        r = c.get("/sdapi/v1/samplers", headers={"Authorization": "Basic !!!"})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    with pytest.raises(ValueError, match="user:password"):
        create_app(models_dir=models_dir, auth="nopassword")


def test_web_page_is_served_without_external_resources(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    html = r.text
    assert 'id="prompt"' in html and 'id="generate"' in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from a CDN
    d = client.get("/plainsd/defaults").json()
    assert d["width"] == 64 and d["sampler"] and d["steps"] >= 1


def test_bad_models_folder_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="no checkpoints"):
        create_app(models_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        create_app(models_dir=tmp_path / "nope")


def test_loras_and_embeddings_from_their_folders(models_dir, tmp_path):
    from safetensors.torch import save_file

    from plainsd.embeddings import Embedding, save_embedding
    from tests.test_lora import random_lora

    sd = plainsd.build("tiny", seed=0)
    (tmp_path / "loras").mkdir()
    (tmp_path / "emb").mkdir()
    save_file(random_lora(sd), str(tmp_path / "loras" / "style.safetensors"))
    vectors = sd.text_encoder.text_model.embeddings.token_embedding.weight[sd.tokenizer.encode("red")].detach()
    save_embedding(Embedding("crimson", vectors), tmp_path / "emb" / "crimson.safetensors")
    app = create_app(models_dir=models_dir, lora_dir=tmp_path / "loras", embeddings_dir=tmp_path / "emb")
    with TestClient(app) as c:
        shipped = list(lora.find_loras(None))  # the shipped model's LCM-LoRA, listed first
        assert shipped == ["plainsd-base.lcm-lora"]
        assert [entry["name"] for entry in c.get("/sdapi/v1/loras").json()] == [*shipped, "style"]
        assert list(c.get("/sdapi/v1/embeddings").json()["loaded"]) == ["crimson"]
        req = {"steps": 2, "width": 32, "height": 32, "seed": 1}
        def pixels(prompt):
            return decode(c.post("/sdapi/v1/txt2img", json={**req, "prompt": prompt}).json()["images"][0]).tobytes()
        plain = pixels("a red x")
        assert pixels("a crimson x") == plain
        assert pixels("a red x <lora:style:1>") != plain
        r = c.post("/sdapi/v1/txt2img", json={**req, "prompt": "<lora:../../etc/passwd:1>"})
        assert r.status_code == 422 and "no LoRA named" in r.json()["detail"]


def test_loras_lists_diffusers_and_peft_files_with_their_metadata(models_dir, tmp_path):
    """diffusers / PEFT files carry no ss_* metadata and generic names: listed by folder, header as A1111 gives it."""
    import torch
    from safetensors.torch import save_file

    from tests.test_lora import random_lora

    sd = plainsd.build("tiny", seed=0)
    loras = tmp_path / "loras"
    (loras / "lcm-like").mkdir(parents=True)
    (loras / "peft-like").mkdir()
    save_file(random_lora(sd), str(loras / "style.safetensors"), metadata={"ss_network_dim": "2", "ss_tag_frequency": '{"a": 1}'})
    key = "unet.down_blocks.0.attentions.0.proj_in"
    config = {"unet.r": 2, "unet.lora_alpha": 2}
    save_file({f"{key}.lora_A.weight": torch.zeros(2, 32, 1, 1), f"{key}.lora_B.weight": torch.zeros(32, 2, 1, 1)},
              str(loras / "lcm-like" / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    save_file({"base_model.model.conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3)},
              str(loras / "peft-like" / "adapter_model.safetensors"))
    (loras / "broken.safetensors").write_bytes(b"not a safetensors file")
    app = create_app(models_dir=models_dir, lora_dir=loras)
    with TestClient(app) as c:
        listed = {entry["name"]: entry for entry in c.get("/sdapi/v1/loras").json()}
    assert sorted(listed) == ["broken", "lcm-like", "peft-like", "plainsd-base.lcm-lora", "style"]
    assert listed["plainsd-base.lcm-lora"]["metadata"]["ss_network_dim"] == "32"
    assert listed["style"]["metadata"] == {"ss_network_dim": "2", "ss_tag_frequency": {"a": 1}}
    assert listed["lcm-like"]["metadata"] == {"format": "pt", "lora_adapter_metadata": config}
    assert listed["peft-like"]["metadata"] == {} and listed["broken"]["metadata"] == {}


def test_fast_mode_is_a_request_field(client):
    req = {"prompt": "a red circle", "steps": 6, "width": 32, "height": 32, "seed": 3, "cfg_scale": 5,
           "sampler_name": "DPM++ 2M"}
    exact = client.post("/sdapi/v1/txt2img", json=req).json()
    fast = client.post("/sdapi/v1/txt2img", json={**req, "fast": True}).json()
    again = client.post("/sdapi/v1/txt2img", json={**req, "fast": True}).json()
    assert fast["parameters"]["fast"] is True and fast["images"] == again["images"]
    assert fast["images"] != exact["images"]  # DeepCache and the guidance cut-off change the picture


def test_tiny_decoder_is_a_request_field():
    from plainsd.fast import FastSettings
    from plainsd.server.api import Txt2ImgRequest, generation_request

    request = generation_request(Txt2ImgRequest(prompt="a red circle", tiny_decoder=True), "txt2img", Limits(), {})
    assert request.fast == FastSettings(deepcache_interval=1, guidance_until=1.0, tiny_decoder=True)
    fast = generation_request(Txt2ImgRequest(prompt="a red circle", fast=True), "txt2img", Limits(), {})
    assert fast.fast.tiny_decoder is False


def test_the_runs_notes_are_in_the_info(client):
    req = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 2, "width": 32, "height": 32, "seed": 3}
    notes = json.loads(client.post("/sdapi/v1/txt2img", json={**req, "cfg_scale": 1}).json()["info"])["notes"]
    assert notes == ["CFG scale 1: the unconditional half is skipped, so the negative prompt has no effect"]
    assert json.loads(client.post("/sdapi/v1/txt2img", json={**req, "cfg_scale": 5}).json()["info"])["notes"] == []


def test_guidance_until_is_a_request_field(client):
    req = {"prompt": "a red circle", "steps": 6, "width": 32, "height": 32, "seed": 3, "cfg_scale": 5,
           "sampler_name": "DPM++ 2M"}
    full = client.post("/sdapi/v1/txt2img", json=req).json()
    cut = client.post("/sdapi/v1/txt2img", json={**req, "guidance_until": 0.5}).json()
    assert "Guidance until: 0.5" in json.loads(cut["info"])["infotexts"][0]
    assert cut["images"] != full["images"] and "Guidance until" not in json.loads(full["info"])["infotexts"][0]


def test_variation_seeds_seed_resize_tiling_and_sampler_noise(client):
    req = {"prompt": "a red circle", "steps": 3, "width": 32, "height": 32, "seed": 3, "sampler_name": "Euler"}
    plain = client.post("/sdapi/v1/txt2img", json=req).json()
    varied = client.post("/sdapi/v1/txt2img", json={**req, "subseed": 50, "subseed_strength": 0.4, "batch_size": 2,
                                                     "seed_resize_from_w": 16, "seed_resize_from_h": 24}).json()
    info = json.loads(varied["info"])
    assert (info["all_seeds"], info["subseed"], info["all_subseeds"]) == ([3, 3], 50, [50, 51])
    assert (info["subseed_strength"], info["seed_resize_from_w"], info["seed_resize_from_h"]) == (0.4, 16, 24)
    fields = parse_infotext(info["infotexts"][1])
    assert (fields["Variation seed"], fields["Variation seed strength"], fields["Seed resize from"]) == ("51", "0.4", "16x24")
    zero = client.post("/sdapi/v1/txt2img", json={**req, "subseed": 50, "subseed_strength": 0}).json()
    assert zero["images"] == plain["images"]
    tiled = client.post("/sdapi/v1/txt2img", json={**req, "tiling": True}).json()
    assert "Tiling: True" in json.loads(tiled["info"])["infotexts"][0] and tiled["images"] != plain["images"]
    churn = client.post("/sdapi/v1/txt2img", json={**req, "s_churn": 1.5}).json()
    assert "Sigma churn: 1.5" in json.loads(churn["info"])["infotexts"][0] and churn["images"] != plain["images"]
    assert json.loads(churn["info"])["extra_generation_params"] == {"Sigma churn": 1.5}
    # A1111's settings of the same purpose, where the request leaves the field out
    by_setting = client.post("/sdapi/v1/txt2img", json={**req, "override_settings": {"s_churn": 1.5}}).json()
    assert by_setting["images"] == churn["images"]
    ancestral = {**req, "sampler_name": "Euler a"}
    eta = client.post("/sdapi/v1/txt2img", json={**ancestral, "eta": 0.5}).json()
    by_setting = client.post("/sdapi/v1/txt2img", json={**ancestral, "override_settings": {"eta_ancestral": 0.5}}).json()
    assert by_setting["images"] == eta["images"] and "Eta: 0.5" in json.loads(eta["info"])["infotexts"][0]
    assert client.post("/sdapi/v1/txt2img", json={**req, "override_settings": {"eta_ancestral": 0.5}}).json()[
        "images"] == plain["images"]  # a setting for the samplers that take eta: Euler does not
    ensd = client.post("/sdapi/v1/txt2img", json={**ancestral, "override_settings": {"eta_noise_seed_delta": 31337}}).json()
    assert "ENSD: 31337" in json.loads(ensd["info"])["infotexts"][0]
    nv = client.post("/sdapi/v1/txt2img", json={**ancestral, "override_settings": {"randn_source": "NV"}}).json()
    assert "RNG: NV" in json.loads(nv["info"])["infotexts"][0] and nv["images"] != eta["images"]
    direct = pipeline.txt2img(client.app.state.store.get(), "a red circle", steps=3, width=32, height=32, seed=3,
                              sampler="Euler a", randn_source="NV")
    assert np.abs(np.asarray(decode(nv["images"][0]), np.int16) - np.asarray(direct.images[0], np.int16)).max() <= 1
    page = client.get("/").text  # the page's controls for them, which send these fields
    assert 'id="tiling"' in page and "body.tiling = true" in page and "subseed_strength:" in page


def test_an_infotext_draws_its_picture_again(client):
    """A1111's infotext field: a picture's parameters, sent alone, draw that picture again (its hires fix and its
    settings too); what plainsd does not act on is in the notes, and a value it cannot read is refused."""
    req = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 4, "width": 32, "height": 48, "seed": 3,
           "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 6, "subseed": 9, "subseed_strength": 0.3,
           "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 3,
           "denoising_strength": 0.6, "override_settings": {"randn_source": "NV", "CLIP_stop_at_last_layers": 2}}
    first = client.post("/sdapi/v1/txt2img", json=req).json()
    text = json.loads(first["info"])["infotexts"][0]
    assert "Hires upscale: 1.5" in text and "RNG: NV" in text and "Clip skip: 2" in text
    again = client.post("/sdapi/v1/txt2img", json={"infotext": text + ", ADetailer model: face_yolov8n.pt"}).json()
    assert decode(again["images"][0]).tobytes() == decode(first["images"][0]).tobytes()
    info = json.loads(again["info"])
    assert info["infotexts"][0] == text
    assert "the infotext's ADetailer model were not applied: plainsd does not act on them" in info["notes"]
    other = client.post("/sdapi/v1/txt2img", json={"infotext": text.replace("Model hash: ", "Model hash: 0")}).json()
    assert any("drawn by the model" in n for n in json.loads(other["info"])["notes"])
    r = client.post("/sdapi/v1/txt2img", json={"infotext": "a cat\nSteps: many, Sampler: Euler, Seed: 1"})
    assert r.status_code == 422 and r.json()["detail"].startswith("infotext: its Steps 'many' is not a value")
    r = client.post("/sdapi/v1/txt2img", json={"infotext": "a cat\nSteps: 2, Sampler: Euler, Size: 36x36"})
    assert r.status_code == 422 and r.json()["detail"].startswith("infotext: width")
    # A1111's order: the infotext's sampler before a client's sampler_index; NGMS is a setting, which the
    # request's own override_settings keep
    short = "a cat\nSteps: 2, Sampler: Euler a, Seed: 1, Size: 32x32, NGMS: 100"
    r = client.post("/sdapi/v1/txt2img", json={"infotext": short, "sampler_index": "Euler",
                                                "override_settings": {"s_min_uncond": 0}}).json()
    assert "Sampler: Euler a," in json.loads(r["info"])["infotexts"][0] and "NGMS" not in r["info"]


def test_hires_fix_as_a1111_clients_ask_for_it(client):
    req = {"prompt": "a red circle", "steps": 4, "width": 32, "height": 48, "seed": 3, "sampler_name": "Euler"}
    r = client.post("/sdapi/v1/txt2img", json={**req, "enable_hr": True, "hr_scale": 2,
                                               "hr_second_pass_steps": 6}).json()
    info = json.loads(r["info"])
    assert decode(r["images"][0]).size == (64, 96) and (info["width"], info["height"]) == (32, 48)
    fields = parse_infotext(info["infotexts"][0])
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"], fields["Denoising strength"]) == \
        ("2", "6", "Latent", "0.7")  # A1111's defaults: the "Latent" upscaler, denoising strength 0.7
    assert info["denoising_strength"] == 0.7
    # the same as the pipeline's hires fix with those settings
    sd = client.app.state.store.get()  # the model the server drew with
    direct = pipeline.txt2img(sd, "a red circle", steps=4, width=32, height=48, seed=3, sampler="Euler",
                             hires=pipeline.HiresFix(scale=2, steps=6, strength=0.7))
    assert np.abs(np.asarray(decode(r["images"][0]), np.int16) - np.asarray(direct.images[0], np.int16)).max() <= 1
    # a final size (the older firstphase_* form too: width/height are then the final size), an image upscaler
    sized = client.post("/sdapi/v1/txt2img", json={**req, "enable_hr": True, "hr_resize_x": 64, "hr_resize_y": 64,
                                                   "hr_upscaler": "Lanczos", "denoising_strength": 0.5}).json()
    assert decode(sized["images"][0]).size == (64, 64)
    assert "Hires resize: 64x64" in json.loads(sized["info"])["infotexts"][0]
    old = client.post("/sdapi/v1/txt2img", json={**req, "enable_hr": True, "width": 64, "height": 64,
                                                 "firstphase_width": 32, "firstphase_height": 48,
                                                 "hr_upscaler": "Lanczos", "denoising_strength": 0.5}).json()
    assert old["images"] == sized["images"]
    # what a client lists to choose from
    assert [u["name"] for u in client.get("/sdapi/v1/upscalers").json()][:3] == ["None", "Lanczos", "Nearest"]
    modes = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes


def test_token_merging_is_a1111s_setting(client):
    req = {"prompt": "a red circle", "steps": 4, "width": 32, "height": 32, "seed": 3, "sampler_name": "Euler"}
    plain = client.post("/sdapi/v1/txt2img", json=req).json()
    merged = client.post("/sdapi/v1/txt2img", json={**req, "override_settings": {"token_merging_ratio": 0.5}}).json()
    assert "Token merging ratio: 0.5" in json.loads(merged["info"])["infotexts"][0]
    assert merged["images"] != plain["images"] and "Token merging" not in json.loads(plain["info"])["infotexts"][0]
    # the server-wide option (A1111's settings page), for every request that does not override it
    assert client.post("/sdapi/v1/options", json={"token_merging_ratio": 0.5}).status_code == 200
    try:
        assert client.post("/sdapi/v1/txt2img", json=req).json()["images"] == merged["images"]
        off = client.post("/sdapi/v1/txt2img", json={**req, "override_settings": {"token_merging_ratio": 0}}).json()
        assert off["images"] == plain["images"]
    finally:
        client.post("/sdapi/v1/options", json={"token_merging_ratio": 0.0})
    # an override kept as the setting (override_settings_restore_afterwards false), as A1111 keeps it
    client.post("/sdapi/v1/txt2img", json={**req, "override_settings": {"token_merging_ratio": 0.5},
                                           "override_settings_restore_afterwards": False})
    try:
        assert client.get("/sdapi/v1/options").json()["token_merging_ratio"] == 0.5
        assert client.post("/sdapi/v1/txt2img", json=req).json()["images"] == merged["images"]
    finally:
        client.post("/sdapi/v1/options", json={"token_merging_ratio": 0.0})
    # img2img's own ratio (where it is not 0) for img2img only
    init = {"init_images": [b64png(Image.new("RGB", (32, 32), (200, 30, 30)))], "denoising_strength": 0.8}
    assert client.post("/sdapi/v1/options", json={"token_merging_ratio_img2img": 0.3}).status_code == 200
    try:
        i2i = client.post("/sdapi/v1/img2img", json={**req, **init}).json()
        assert "Token merging ratio: 0.3" in json.loads(i2i["info"])["infotexts"][0]
        assert client.post("/sdapi/v1/txt2img", json=req).json()["images"] == plain["images"]
    finally:
        client.post("/sdapi/v1/options", json={"token_merging_ratio_img2img": 0.0})
    r = client.post("/sdapi/v1/options", json={"token_merging_ratio_img2img": "half"})
    assert r.status_code == 422 and "token_merging_ratio_img2img must be at least 0 and below 1" in r.json()["detail"]
    assert client.post("/sdapi/v1/txt2img", json=req).json()["images"] == plain["images"]
    # the hires fix's second pass: its own ratio (token_merging_ratio_hr), else the first pass's
    hr = {**req, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "denoising_strength": 0.5}
    hr_plain = client.post("/sdapi/v1/txt2img", json=hr).json()
    hr_own = client.post("/sdapi/v1/txt2img", json={**hr, "override_settings": {"token_merging_ratio_hr": 0.5}}).json()
    info = json.loads(hr_own["info"])["infotexts"][0]
    assert "Token merging ratio hr: 0.5" in info and "Token merging ratio:" not in info
    assert hr_own["images"] != hr_plain["images"]
    assert client.post("/sdapi/v1/options", json={"token_merging_ratio_hr": 0.5}).status_code == 200
    try:
        assert client.post("/sdapi/v1/txt2img", json=hr).json()["images"] == hr_own["images"]
    finally:
        client.post("/sdapi/v1/options", json={"token_merging_ratio_hr": 0.0})
    r = client.post("/sdapi/v1/txt2img", json={**hr, "override_settings": {"token_merging_ratio_hr": 1}})
    assert r.status_code == 422 and "token_merging_ratio_hr must be at least 0 and below 1" in r.json()["detail"]


def test_checkpoints_limit_reaches_the_engine(client):
    """A1111's sd_checkpoints_limit (1: the refiner's UNet and the base's take turns in memory): the server's
    setting, or a request's override for that request, on the engine that draws it."""
    store = client.app.state.store
    req = {"prompt": "x", "steps": 1, "width": 32, "height": 32}
    assert client.get("/sdapi/v1/options").json()["sd_checkpoints_limit"] == 1
    assert client.post("/sdapi/v1/txt2img", json=req).status_code == 200
    assert store.get().checkpoints_limit == 1
    r = client.post("/sdapi/v1/txt2img", json={**req, "override_settings": {"sd_checkpoints_limit": 2}})
    assert r.status_code == 200 and store.get().checkpoints_limit == 2
    assert client.post("/sdapi/v1/options", json={"sd_checkpoints_limit": 3}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json=req).status_code == 200 and store.get().checkpoints_limit == 3
    r = client.post("/sdapi/v1/options", json={"sd_checkpoints_limit": 1.5})
    assert r.status_code == 422 and "sd_checkpoints_limit must be a whole number from 1 to 10, got 1.5" in r.text
    assert client.post("/sdapi/v1/options", json={"sd_checkpoints_limit": 1}).status_code == 200


def test_sampler_settings_reach_each_pass_and_bad_options_are_refused_when_set(client):
    from plainsd.diffusion.samplers import resolve_sampler
    from plainsd.server import api

    limits = Limits()
    options = {"eta_ancestral": 0.5, "eta_ddim": 0.0, "s_churn": 0.4}
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "sampler_name": "DDIM", "enable_hr": True,
            "hr_sampler_name": "Euler"}
    request = api.generation_request(api.Txt2ImgRequest(**body), "txt2img", limits, options)
    ddim, euler, euler_a = (resolve_sampler(name)[0] for name in ("DDIM", "Euler", "Euler a"))
    # A1111 gives each pass's sampler the eta of its kind, and s_churn to the hires Euler although DDIM has none
    assert request.sampler_options(ddim) == {"eta": 0.0} and request.sampler_options(euler)["s_churn"] == 0.4
    assert request.sampler_options(euler_a)["eta"] == 0.5
    for bad, words in [({"tiling": "yes"}, "tiling setting must be true or false"),
                       ({"s_noise": -1}, "s_noise must be a number of at least 0"),
                       ({"initial_noise_multiplier": 9}, "initial_noise_multiplier must be between 0 and 1.5")]:
        r = client.post("/sdapi/v1/options", json=bad)
        assert r.status_code == 422 and words in r.json()["detail"], r.text
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 32, "height": 32})
    assert r.status_code == 200, r.text  # nothing of the refused settings was kept
