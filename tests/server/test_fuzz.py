"""The API fuzzed with schemathesis from its own OpenAPI schema, in-process on the tiny model: generated requests
(valid ones and ones the schema says are invalid) to the generation, png-info, options, list and ControlNet routes
(alwayson_scripts' ControlNet units among the generation's fields) get no 5xx, their answers (status, content type,
body) are as the schema documents them, invalid data is refused, and the server answers a normal request afterwards.

Sizes, steps and image counts are bounded by the server's limits, which the schema states (api.state_limits), so
the generated requests stay small. Requests the schema allows may still be refused for reasons a schema cannot
express (an init image that is not an image, sizes whose hires fix grows past the limit, batch_size x n_iter), so
valid data is not required to be accepted; a third of the cases are valid ones made likely to be drawn
(drawable), so that generation itself is fuzzed too.
"""

import base64
import io

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
import torch

import plainsd
from plainsd.server import Limits, create_app
from plainsd.server.api import NOT_SUPPORTED

LIMITS = Limits(max_size=64, max_steps=2, max_images=2, max_image_pixels=128 * 128, max_image_bytes=2**20)
# (method, route): the generation, png-info, options and list routes
FUZZED = [("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img"), ("POST", "/sdapi/v1/png-info"),
          ("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/options"), *[("GET", f"/sdapi/v1/{name}") for name in (
              "samplers", "schedulers", "sd-models", "upscalers", "latent-upscale-modes", "sd-vae", "loras",
              "embeddings", "prompt-styles")],
          # the ControlNet extension's routes
          ("POST", "/controlnet/detect"), *[("GET", f"/controlnet/{name}") for name in (
              "version", "model_list", "module_list", "settings")]]
EXAMPLES = {"POST": 16, "GET": 2}  # a GET route here takes no parameters, or a true/false one

def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


INIT = _png(Image.new("RGB", (24, 40), (30, 120, 200)))  # a small init image for img2img


def drawable(case):
    """A valid generated request made likely to be drawn, not refused: what plainsd refuses left out, small
    defaults for what the case leaves out, and a real init image (random text is never one)."""
    if not isinstance(case.body, dict):
        return case
    body = {"width": 32, "height": 32, "steps": 1, **case.body, "alwayson_scripts": {}, "override_settings": None}
    for name in (*NOT_SUPPORTED, "styles", "script_name", "script_args", "mask", "latent_mask", "sampler_index"):
        body.pop(name, None)
    if case.operation.path.endswith("img2img"):
        body["init_images"] = [INIT]
    case.body = body
    return case


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    plainsd.save(plainsd.build("tiny", seed=0), folder / "tiny.safetensors")
    return create_app(models_dir=folder, outputs=tmp_path_factory.mktemp("outputs"), limits=LIMITS)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:  # (the app's lifespan ends with this client: one for the whole module)
        yield c


@pytest.fixture(scope="module")
def api_schema(client):
    return schemathesis.openapi.from_dict(client.get("/openapi.json").json())


def send(client: TestClient, case):
    """The generated request through the module's client (schemathesis's own ASGI transport would end the app's
    lifespan after each test, and the server's queue with it)."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    data = kwargs.pop("data", None)
    if data is not None:  # a body that is not JSON (schemathesis's negative cases): sent as it is
        kwargs["content"] = data
    return client.request(**{k: v for k, v in kwargs.items() if k in ("method", "url", "headers", "params", "json",
                                                                       "content", "cookies")})


@pytest.mark.parametrize("method, route", FUZZED)
def test_fuzzed_requests_get_documented_answers_and_no_server_error(client, api_schema, method, route):
    operation = api_schema[route][method]
    valid = operation.as_strategy(GenerationMode.POSITIVE)
    cases = st.one_of(valid, operation.as_strategy(GenerationMode.NEGATIVE), valid.map(drawable))

    @given(cases)
    @settings(max_examples=EXAMPLES[method], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def answers_as_documented(case):
        case.validate_response(send(client, case), excluded_checks=[positive_data_acceptance])

    # hypothesis refuses to draw floats while denormals flush to zero, which runtime.prepare's bf16 path turns on
    # for the process (an earlier test may have): off, as in a fresh process
    torch.set_flush_denormal(False)
    answers_as_documented()


def test_the_schema_states_the_servers_limits(client):
    fields = client.get("/openapi.json").json()["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    assert (fields["width"]["maximum"], fields["width"]["multipleOf"], fields["width"]["minimum"]) == (64, 8, 8)
    assert (fields["steps"]["maximum"], fields["n_iter"]["maximum"]) == (2, 2)
    assert fields["cfg_scale"]["maximum"] == 100 and fields["seed"]["minimum"] == -1
    assert "Karras" in fields["scheduler"]["anyOf"][0]["enum"]


def test_the_server_answers_a_normal_request_after_the_fuzzing(client):
    # the settings a fuzzed /sdapi/v1/options may have changed (they are meant to last), as at the start
    assert client.post("/sdapi/v1/options", json={
        "sd_model_checkpoint": "tiny", "CLIP_stop_at_last_layers": 1, "token_merging_ratio": 0.0,
        "token_merging_ratio_img2img": 0.0, "token_merging_ratio_hr": 0.0}).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "width": 32, "height": 32})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert image.size == (32, 32) and client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
