"""A batch file read into jobs: one A1111 txt2img or img2img request per line, mapped onto a GenerationRequest
by the server's own mapping (server/api.generation_request), so a line means what the same JSON posted to
/sdapi/v1/txt2img or /sdapi/v1/img2img means. Each job has a key, a hash of the request, the model and how the
model runs, which says whether an earlier run already drew it."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from plainsd.lora import find_loras
from plainsd.prompts import extract_loras
from plainsd.request import GenerationRequest


@dataclass
class Job:
    """One line of the batch, checked and ready to draw."""
    line: int                     # its line number in the file, from 1
    key: str                      # sha256 (hex) of the canonical request, the model's hash, precision and backend
    request: GenerationRequest    # styles already applied (a worker needs no styles file)
    files: list[str]              # the pictures' names in the output folder, one per image the request draws


@dataclass
class Setup:
    """What every line is drawn with: the model (and its hash), how it runs, and the folders requests name."""
    model: str
    model_sha256: str
    precision: str                # "bf16" or "fp32", chosen once by the driver so that every worker agrees
    backend: str = "eager"
    lora_dir: str | None = None
    embeddings_dir: str | None = None
    styles: str | None = None     # A1111's styles.csv (or a folder or wildcard) for the requests' styles
    controlnet_dir: str | None = None
    upscalers_dir: str | None = None  # upscaler models the requests' hr_upscaler names


def read_jobs(path: str | Path, setup: Setup) -> list[Job]:
    """Every non-blank line of a JSON-lines file as a Job, all checked before anything is drawn; a bad line raises
    ValueError with one sentence that names its line number."""
    try:
        from plainsd.server import api
    except ImportError as e:
        raise ValueError(f"plainsd batch reads requests with the A1111 API's request models, which need FastAPI "
                         f"and pydantic ({e}); install them with: pip install 'plainsd[serve]'") from None
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"no such requests file: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; write one JSON request per line") from None
    jobs, copies = [], Counter()
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            kind, req = _parse(text, api)
            canonical = json.dumps({"kind": kind, "request": req.model_dump(mode="json")}, sort_keys=True,
                                   separators=(",", ":"))
            request = _request(req, kind, setup, api)
        except ValueError as e:  # (api.BadRequest too)
            raise ValueError(f"{path.name} line {number}: {e}") from None
        copies[canonical] += 1
        key = job_key(canonical, setup, copies[canonical] - 1)
        jobs.append(Job(number, key, request, picture_names(number, key, request.batch_size * request.batch_count)))
    if not jobs:
        raise ValueError(f"{path} holds no requests; write one A1111 txt2img or img2img request (JSON) per line")
    return jobs


def _parse(text: str, api):
    """A line -> ("txt2img" or "img2img", the API's request model); a line with init_images is an img2img one."""
    from pydantic import ValidationError

    try:
        payload = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(payload, dict):
        raise ValueError("a line must be one JSON object: an A1111 txt2img or img2img request")
    kind = "img2img" if "init_images" in payload else "txt2img"
    model = api.Img2ImgRequest if kind == "img2img" else api.Txt2ImgRequest
    try:
        return kind, model.model_validate(payload)
    except ValidationError as e:  # (located as the API locates a body's fields)
        raise ValueError(api.validation_sentence([{**err, "loc": ("body", *err["loc"])} for err in e.errors()])) from None


def _request(req, kind: str, setup: Setup, api) -> GenerationRequest:
    """The line's GenerationRequest, mapped as the server maps it, under A1111's default settings; what a batch
    cannot do is refused here rather than ignored."""
    if req.script_name:
        raise ValueError("script_name: a batch line is one generation, so scripts are not run here "
                         "(plainsd serve runs them)")
    if req.infotext:
        raise ValueError("infotext: a batch line's settings are its fields (plainsd serve reads an infotext)")
    if (req.override_settings or {}).get("sd_model_checkpoint"):
        raise ValueError("override_settings.sd_model_checkpoint: a batch draws every line with one model (--model)")
    if (req.override_settings or {}).get("sd_vae", "Automatic") != "Automatic":
        raise ValueError("override_settings.sd_vae: a batch draws every line with its model's own VAE, so only "
                         "'Automatic' is accepted")
    if (req.override_settings or {}).get("sd_checkpoints_limit", 1) != 1:
        raise ValueError("override_settings.sd_checkpoints_limit: a batch keeps one UNet in memory at a time in a "
                         "refiner run, so only 1 is accepted")
    if req.do_not_save_samples:
        raise ValueError("do_not_save_samples: a batch writes every picture it draws, so only false is accepted")
    request = api.generation_request(req, kind, api.Limits(), api.default_options(), setup.backend, setup.styles,
                                     setup.controlnet_dir, setup.upscalers_dir)
    request = request.replace(lora_dir=setup.lora_dir, embeddings_dir=setup.embeddings_dir).styled()
    available = find_loras(setup.lora_dir)
    for name, _ in extract_loras(request.prompt)[1]:  # (the pipeline would refuse it only once drawing)
        if name not in available:
            raise ValueError(f"no LoRA named {name!r} in {setup.lora_dir or 'the shipped LoRAs (no --lora-dir)'}; "
                             f"available: {', '.join(available) or 'none'}")
    return request


def job_key(canonical: str, setup: Setup, copy: int = 0) -> str:
    """The job's key: the canonical request with the model's hash, the precision and the backend (each draws
    differently). The n-th identical line of a file is its own job (copy n), so ten copies of a random-seed
    request draw ten pictures, and a rerun still finds each."""
    what = {"request": canonical, "model": setup.model_sha256, "precision": setup.precision, "backend": setup.backend}
    if copy:
        what["copy"] = copy
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def picture_names(line: int, key: str, n: int) -> list[str]:
    """Stable names: the line number (for order in a file browser) and the key's start (for uniqueness); a request
    of several images numbers them from 1."""
    stem = f"{line:05d}-{key[:10]}"
    return [f"{stem}.png"] if n == 1 else [f"{stem}-{i}.png" for i in range(1, n + 1)]


def model_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file, or of a diffusers folder's files (names and contents, in order)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"no model file or diffusers folder at {path}")
    total = hashlib.sha256()
    for file in files:
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if len(files) == 1 and file == path:
            return h.hexdigest()
        total.update(f"{file.relative_to(path).as_posix()}\0{h.hexdigest()}\n".encode())
    return total.hexdigest()
