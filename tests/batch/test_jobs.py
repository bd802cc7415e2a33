"""Reading a batch file: the server's mapping, keys, names, and bad lines refused before anything is written."""

import json

import pytest
from PIL import Image

from plainsd.batch import Setup, read_jobs
from plainsd.batch.jobs import job_key, model_sha256, picture_names
from plainsd.cli import main
from plainsd.server import api

from .conftest import LINES, write_requests

SETUP = Setup("m.safetensors", "0" * 64, "fp32")


def _jobs(tmp_path, lines, setup=SETUP):
    return read_jobs(write_requests(tmp_path / "r.jsonl", lines), setup)


def test_a_line_means_what_the_server_makes_of_it(tmp_path):
    jobs = _jobs(tmp_path, LINES)
    assert [j.line for j in jobs] == list(range(1, 9))
    for job, line in zip(jobs, LINES):
        expected = api.generation_request(api.Txt2ImgRequest(**line), "txt2img", api.Limits(), api.default_options())
        assert job.request == expected
    assert jobs[2].request.negative_prompt == "red" and jobs[2].request.schedule == "karras"
    assert len(jobs[4].files) == 2  # batch_size 2: two pictures


def test_a_line_with_init_images_is_img2img(tmp_path):
    image = api.encode_png(Image.new("RGB", (64, 64), (200, 10, 10)))
    [job] = _jobs(tmp_path, [{"prompt": "a", "init_images": [image], "steps": 4, "denoising_strength": 0.5}])
    assert job.request.init_image.getpixel((3, 3)) == (200, 10, 10)
    assert job.request.strength == 0.5


def test_keys_follow_the_request_the_model_and_the_precision(tmp_path):
    a, b = _jobs(tmp_path, [{"prompt": "x", "seed": 1}, {"prompt": "x", "seed": 2}])
    spelt_out = _jobs(tmp_path, [{"seed": 1, "prompt": "x", "steps": 50, "cfg_scale": 7.0}])[0]
    assert spelt_out.key == a.key != b.key  # defaults spelt out or not, any key order: the same canonical request
    other_model = _jobs(tmp_path, [{"prompt": "x", "seed": 1}], Setup("m", "1" * 64, "fp32"))[0]
    other_precision = _jobs(tmp_path, [{"prompt": "x", "seed": 1}], Setup("m", "0" * 64, "bf16"))[0]
    other_backend = _jobs(tmp_path, [{"prompt": "x", "seed": 1}], Setup("m", "0" * 64, "fp32", "openvino"))[0]
    assert len({a.key, other_model.key, other_precision.key, other_backend.key}) == 4


def test_identical_lines_are_copies_with_keys_of_their_own(tmp_path):
    canonical = json.dumps({"x": 1})
    assert job_key(canonical, SETUP, 0) != job_key(canonical, SETUP, 1)
    keys = [j.key for j in _jobs(tmp_path, [{"prompt": "x"}] * 3)]
    assert len(set(keys)) == 3
    assert keys == [j.key for j in _jobs(tmp_path, [{"prompt": "x"}] * 3)]  # and a rerun finds each again


def test_picture_names_are_stable():
    assert picture_names(7, "abcdef0123456789", 1) == ["00007-abcdef0123.png"]
    assert picture_names(7, "abcdef0123456789", 2) == ["00007-abcdef0123-1.png", "00007-abcdef0123-2.png"]


def test_model_hash_is_the_files_sha256(tmp_path):
    import hashlib
    (tmp_path / "m.bin").write_bytes(b"weights")
    assert model_sha256(tmp_path / "m.bin") == hashlib.sha256(b"weights").hexdigest()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"1")
    before = model_sha256(tmp_path / "d")
    (tmp_path / "d" / "a").write_bytes(b"2")
    assert model_sha256(tmp_path / "d") != before


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "x", "steps": 4', "not valid JSON"),
    ('["a list"]', "one JSON object"),
    ('{"prompt": "x", "stepz": 4}', "unknown field stepz"),
    ('{"prompt": "x", "sampler_name": "Euler b"}', "unknown sampler"),
    ('{"prompt": "x", "width": 4000}', "width and height must be between 8 and 2048"),
    ('{"prompt": "x", "script_name": "x/y/z plot"}', "script_name"),
    ('{"prompt": "x", "override_settings": {"sd_model_checkpoint": "other"}}', "one model"),
    ('{"prompt": "x <lora:missing:1>"}', "no LoRA named 'missing'"),
    ('{"infotext": "a cat\\nSteps: 4, Seed: 1, Sampler: Euler"}', "a batch line's settings are its fields"),
])
def test_a_bad_line_stops_the_batch_before_anything_is_written(tmp_path, model_file, capsys, line, words):
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps(LINES[0]) + "\n\n" + line + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(requests), "-o", str(out), "--model", str(model_file), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plainsd: error: r.jsonl line 3: ") and words in err, err
    assert len(err.splitlines()) == 1
    assert not out.exists()
