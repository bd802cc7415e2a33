"""A tiny model in a file and a batch of eight small requests, shared by the batch tests."""

import json

import pytest
import torch

import plainsd

# eight requests: seeds, samplers, a negative prompt, a request of two images, a LoRA-free prompt syntax
LINES = [
    {"prompt": "a red circle", "seed": 1, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler"},
    {"prompt": "a blue square", "seed": 2, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler a"},
    {"prompt": "a green triangle", "negative_prompt": "red", "seed": 3, "steps": 4, "width": 64, "height": 64,
     "sampler_name": "DPM++ 2M", "scheduler": "karras", "cfg_scale": 5},
    {"prompt": "a (yellow:1.3) star", "seed": 4, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"},
    {"prompt": "two circles", "seed": 5, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler",
     "batch_size": 2},
    {"prompt": "a red circle", "seed": 6, "steps": 4, "width": 64, "height": 64, "sampler_name": "Heun"},
    {"prompt": "a purple square", "seed": 7, "steps": 4, "width": 64, "height": 64, "sampler_name": "DDIM"},
    {"prompt": "a white circle", "seed": 8, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler",
     "cfg_scale": 1},
]


@pytest.fixture(scope="session")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch-model") / "tiny.safetensors"
    plainsd.save(plainsd.build("tiny", seed=0), path)
    return path


def write_requests(path, lines=LINES):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def requests_file(tmp_path):
    return write_requests(tmp_path / "requests.jsonl")


@pytest.fixture
def one_thread():
    """Every worker of these tests runs one torch thread: a different thread count may change a picture's last
    bits (the order of a parallel sum), which byte comparisons would see."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


def pictures(folder) -> dict:
    """name -> bytes of every PNG in the folder."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def manifest(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
