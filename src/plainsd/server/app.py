"""The HTTP server: AUTOMATIC1111's /sdapi/v1 routes and a web page, on FastAPI.

    app = create_app(models_dir="models")        # or model="m.safetensors"; neither: the shipped model
    uvicorn.run(app, host="127.0.0.1", port=7860)

One generation runs at a time; the others wait in a bounded queue (503 with Retry-After when it is full).
A request whose client disconnects is dropped from the queue, or interrupted at its next step if it runs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from plainsd import pipeline, scripts, vaes
from plainsd.pnginfo import save_png
from plainsd.request import LATENT_UPSCALERS
from plainsd.styles import read_styles
from plainsd.xyz import Checkpoints

from . import api, controlnet, extras, infotext, interrogate
from .jobs import Job, JobQueue, QueueFull
from .models import ModelStore

RETRY_AFTER_SECONDS = 5
# what every route may answer besides its own answer (the OpenAPI schema says so)
ERRORS = {422: {"model": api.ErrorResponse, "description": "a bad request, in one sentence"},
          503: {"model": api.ErrorResponse, "description": "the queue is full; retry after Retry-After seconds"}}


@dataclass
class Server:
    """What the routes share: the models, the job queue, the limits, A1111's settings and the folders."""
    store: ModelStore
    queue: JobQueue
    limits: api.Limits
    options: dict          # A1111's settings (/sdapi/v1/options)
    outputs: Path          # where save_images writes when the options name no folder
    lora_dir: str | Path | None
    embeddings_dir: str | Path | None
    authenticated: bool
    styles_file: str | None = None   # A1111's styles.csv (or a folder of them) for the requests' styles
    controlnet_dir: str | None = None   # ControlNet models besides the shipped one, for the requests' units
    upscalers_dir: str | None = None    # upscaler models (A1111's models/ESRGAN ... or one folder) besides plainsd-x4
    captioners: interrogate.Captioners | None = None  # what /sdapi/v1/interrogate captions with


def create_app(model: str | Path | None = None, models_dir: str | Path | None = None, *,
               auth: str | None = None, max_queue: int = 16, limits: api.Limits | None = None,
               outputs: str | Path = "outputs/api", lora_dir: str | Path | None = None,
               embeddings_dir: str | Path | None = None, precision: str = "auto", backend: str = "eager",
               styles: str | Path | None = None, controlnet_dir: str | Path | None = None,
               upscalers_dir: str | Path | None = None, vae_dir: str | Path | None = None,
               captioner: str | Path | None = None) -> FastAPI:
    """auth: "user:pass" (several separated by commas) for HTTP basic auth on every route.
    lora_dir / embeddings_dir: folders whose LoRAs (<lora:name:weight>) and embeddings prompts may use.
    controlnet_dir: a folder of ControlNet models (A1111's models/ControlNet), offered besides the shipped one.
    upscalers_dir: upscaler models (A1111's models folder with ESRGAN/, RealESRGAN/ ..., or one folder of files),
    offered besides the shipped one for Extras, the hires fix and SD upscale.
    vae_dir: a folder of VAE files (A1111's models/VAE) for the sd_vae setting, besides the models folder's *.vae.* files.
    captioner: what /sdapi/v1/interrogate captions with (plainsd.captioning.load_captioner: "plainsd", the shipped
    one, by default; a captioner file or a BLIP folder).
    precision / backend: how the models run (plainsd.runtime). styles: A1111's styles.csv, a folder of such files
    or a wildcard, read again for each request (/sdapi/v1/prompt-styles lists them)."""
    for folder in (lora_dir, embeddings_dir, controlnet_dir, upscalers_dir, vae_dir):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"folder {folder} does not exist")
    if styles is not None:
        read_styles(styles)  # a missing or malformed file is reported now, not at the first request
    credentials = _parse_auth(auth)
    options = {**api.default_options(), "outdir_samples": str(outputs)}
    server = Server(ModelStore(model, models_dir, precision, backend, vae_dir), JobQueue(max_queue), limits or api.Limits(),
                    options, Path(outputs), lora_dir, embeddings_dir, bool(credentials),
                    None if styles is None else str(styles), None if controlnet_dir is None else str(controlnet_dir),
                    None if upscalers_dir is None else str(upscalers_dir),
                    interrogate.Captioners(None if captioner is None else str(captioner), precision))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.queue.close()

    app = FastAPI(title="plainsd", description="AUTOMATIC1111-compatible API of plainsd", version="1",
                  lifespan=lifespan, responses=ERRORS)
    plain_openapi = app.openapi
    app.openapi = lambda: api.state_limits(plain_openapi(), server.limits)
    app.state.store, app.state.queue, app.state.limits = server.store, server.queue, server.limits
    if credentials:
        app.add_middleware(_BasicAuth, credentials=credentials)
    app.add_exception_handler(api.BadRequest, _bad_request)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for routes in (_generation_routes, _extras_routes, _interrogate_routes, _control_routes, _list_routes, _settings_routes,
                   _controlnet_routes, _page_routes):
        app.include_router(routes(server))
    return app


async def _bad_request(request: Request, exc: api.BadRequest):
    return JSONResponse({"error": "BadRequest", "detail": str(exc)}, status_code=422)


async def _invalid(request: Request, exc: RequestValidationError):
    return JSONResponse({"error": "BadRequest", "detail": api.validation_sentence(exc.errors()),
                         "errors": _jsonable(exc.errors())}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 400:  # FastAPI could not read the body at all (bytes that are not UTF-8 ...): a bad request
        return JSONResponse({"error": "BadRequest", "detail": "the request body could not be read; send JSON in UTF-8"},
                            status_code=422)
    return await http_exception_handler(request, exc)


# --- generation ---------------------------------------------------------------------------------------

def _generation_routes(server: Server) -> APIRouter:
    router = APIRouter()

    @router.post("/sdapi/v1/txt2img", response_model=api.ImagesResponse)
    async def txt2img(req: api.Txt2ImgRequest, http: Request):
        return await _generate(server, http, req, "txt2img")

    @router.post("/sdapi/v1/img2img", response_model=api.ImagesResponse)
    async def img2img(req: api.Img2ImgRequest, http: Request):
        return await _generate(server, http, req, "img2img")

    return router


async def _generate(server: Server, http: Request, req: api.Txt2ImgRequest, kind: str) -> dict:
    """An A1111 request through the queue: checked, drawn, answered as A1111 answers."""
    store, options = server.store, server.options
    notes, read = [], {}
    if req.infotext:  # (its labels fill what the request leaves unset)
        req, notes, read = infotext.apply(req, kind, store.vaes())
    overrides = req.override_settings or {}
    entry = _find(store, overrides["sd_model_checkpoint"]) if overrides.get("sd_model_checkpoint") else store.current
    notes += infotext.model_note(read, entry.title, entry.hash)
    vae_setting = overrides.get("sd_vae", options.get("sd_vae"))
    vae = _vae(store, vae_setting, entry)
    if req.refiner_checkpoint not in (None, "", "None"):  # one of the server's models, by name as A1111 finds it
        req = req.model_copy(update={"refiner_checkpoint": str(_find(store, req.refiner_checkpoint).path)})
    request = api.generation_request(req, kind, server.limits, options, store.backend, server.styles_file,
                                     server.controlnet_dir, server.upscalers_dir).replace(
        lora_dir=server.lora_dir, embeddings_dir=server.embeddings_dir)
    script = api.script_plan(req, kind, request, server.limits, _checkpoints(store, entry, vae_setting), store.backend)
    settings = {**options, **overrides}  # (before the request's overrides may become the server's below)
    limit = api.checkpoints_limit_setting(settings)
    if not req.override_settings_restore_afterwards:  # A1111 keeps such overrides as its settings
        if overrides.get("sd_model_checkpoint"):
            store.select(entry.name)
        options.update({name: overrides[name] for name in (*api.REQUEST_SETTINGS, "sd_vae", "sd_checkpoints_limit")
                        if name in overrides})

    def work(job: Job):
        engine = _drawing(store, entry, vae, vae_setting)
        engine.checkpoints_limit = limit

        def on_step(info: pipeline.StepInfo):
            job.batch_step, job.batch_steps = info.step + 1, info.total
            job.step = info.batch * info.total + info.step + 1
            job.steps_total = info.total * request.batch_count
            job.preview = info
        controls = dict(callback=on_step, interrupt=job.should_stop, skip=job.take_skip)
        if script is not None:
            result = script(engine, **controls)
        else:
            result = pipeline.generate(engine, request, **controls)
        return engine, result, controlnet.detected_maps(result, controlnet.saves(req.alwayson_scripts), settings)

    # (steps_total: on_step corrects it, a hires fix adds steps)
    engine, result, maps = await _run(server.queue, http, Job(work, kind=kind,
                                                              steps_total=request.steps * request.batch_count))
    result.parameters.notes += [n for n in notes if n not in result.parameters.notes]
    if req.save_images:
        folder = Path(options.get("outdir_samples") or server.outputs)
        for i, (image, text) in enumerate(zip(result.images, result.infotexts)):
            save_png(image, folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{result.seeds[i]}-{i}.png", text)
    with_init = kind == "img2img" and getattr(req, "include_init_images", False)
    encoded = [api.encode_png(im, text) for im, text in zip(result.images, result.infotexts)] if req.send_images else []
    if req.send_images:  # the ControlNet extension's detected maps follow the pictures
        encoded += [api.encode_png(image) for image in maps]
    if with_init and req.send_images:
        encoded += [api.encode_png(request.init_image)]
    return {"images": encoded, "parameters": api.echo(req, drop_images=kind == "img2img" and not with_init),
            "info": api.info_json(req, result, request, engine.sd)}


# --- Extras ----------------------------------------------------------------------------------------------

def _extras_routes(server: Server) -> APIRouter:
    router = APIRouter()

    @router.post("/sdapi/v1/extra-single-image", response_model=extras.ExtrasSingleImageResponse)
    async def extra_single_image(req: extras.ExtrasSingleImageRequest, http: Request):
        images, html_info = await _extras(server, http, req)
        return {"html_info": html_info, "image": images[0]}

    @router.post("/sdapi/v1/extra-batch-images", response_model=extras.ExtrasBatchImagesResponse)
    async def extra_batch_images(req: extras.ExtrasBatchImagesRequest, http: Request):
        images, html_info = await _extras(server, http, req)
        return {"html_info": html_info, "images": images}

    return router


async def _extras(server: Server, http: Request, req: extras.ExtrasBaseRequest) -> tuple[list[str], str]:
    """Extras' upscaling through the queue (one job at a time, as generations): checked first, then run."""
    settings = extras.settings(req, server.upscalers_dir)
    pictures = extras.pictures(req, server.limits)
    extras.check_sizes(pictures, settings, server.limits)
    options = dict(server.options)
    return await _run(server.queue, http, Job(lambda job: extras.run(pictures, settings, server.upscalers_dir,
                                                                     options, server.store.precision), kind="extras"))


def _interrogate_routes(server: Server) -> APIRouter:
    router = APIRouter()

    @router.post("/sdapi/v1/interrogate", response_model=interrogate.InterrogateResponse)
    async def interrogate_image(req: interrogate.InterrogateRequest, http: Request):
        """A1111's interrogate: the picture's caption (see server/interrogate.py for what each model is here)."""
        captioner = server.captioners.for_model(req.model)
        image = api.decode_image(req.image, "image", server.limits).convert("RGB")
        caption = await _run(server.queue, http, Job(lambda job: captioner.caption([image])[0], kind="interrogate"))
        return {"caption": caption}

    return router


async def _run(queue: JobQueue, http: Request, job: Job):
    """Queue the job, wait for it (cancelled when the client goes away) and return what it returns."""
    try:
        queue.submit(job)
    except QueueFull as e:
        raise HTTPException(503, str(e), headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    wrapped = asyncio.wrap_future(job.future)
    while not wrapped.done():
        await asyncio.wait({wrapped}, timeout=0.25)
        if not wrapped.done() and await http.is_disconnected():
            queue.cancel(job)
            break
    if job.cancelled:
        raise HTTPException(499, "the client went away; the job was cancelled")
    try:
        return wrapped.result()
    except ValueError as e:  # what the pipeline refuses (e.g. a LoRA tag, a size the model cannot take)
        raise api.BadRequest(str(e)) from None


# --- progress and control -----------------------------------------------------------------------------

def _control_routes(server: Server) -> APIRouter:
    router, queue = APIRouter(), server.queue

    @router.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        return _progress(queue, skip_current_image)

    @router.post("/sdapi/v1/interrupt")
    async def interrupt():
        if queue.current is not None:
            queue.current.interrupt()
        return {}

    @router.post("/sdapi/v1/skip")
    async def skip():
        if queue.current is not None:
            queue.current.skipped = True
        return {}

    return router


def _progress(queue: JobQueue, skip_current_image: bool) -> dict:
    """A1111's progress answer for the job that runs (and a preview of its current estimate)."""
    job = queue.current
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
             "job_count": queue.waiting() + (job is not None), "job_timestamp": "0", "job_no": 0,
             "sampling_step": 0, "sampling_steps": 0}
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                "textinfo": None, "current_task": None}
    fraction = min(job.step / max(job.steps_total, 1), 1.0)
    elapsed = time.time() - (job.started or time.time())
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    state.update(job=job.kind, interrupted=job.interrupted, skipped=job.skipped,
                 job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or time.time())),
                 sampling_step=job.batch_step, sampling_steps=job.batch_steps)
    image = None
    if not skip_current_image and job.preview is not None:
        previews = job.preview.preview()
        image = api.encode_png(_grid(previews)) if previews else None
    return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": image,
            "textinfo": f"step {job.batch_step} of {job.batch_steps}", "current_task": job.kind}


# --- lists -----------------------------------------------------------------------------------------------

def _list_routes(server: Server) -> APIRouter:
    router, store = APIRouter(), server.store

    @router.get("/sdapi/v1/samplers")
    async def samplers():
        return api.samplers()

    @router.get("/sdapi/v1/schedulers")
    async def schedulers():
        return api.schedulers()

    @router.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [e.describe() for e in store.entries()]

    @router.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        await asyncio.to_thread(store.refresh)
        return {}

    @router.get("/sdapi/v1/upscalers")
    async def upscalers():
        from plainsd.upscale import describe
        return await asyncio.to_thread(describe, server.upscalers_dir)

    @router.get("/sdapi/v1/realesrgan-models")
    async def realesrgan_models():
        return await asyncio.to_thread(extras.realesrgan_models, server.upscalers_dir)

    @router.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        return [{"name": name} for name in LATENT_UPSCALERS]

    @router.get("/sdapi/v1/sd-vae")
    async def sd_vae():
        return [{"model_name": name, "filename": str(path)} for name, path in store.vaes().items()]

    @router.post("/sdapi/v1/refresh-vae")
    async def refresh_vae():
        await asyncio.to_thread(store.refresh_vaes)
        return {}

    @router.get("/sdapi/v1/loras")
    async def loras():
        from plainsd.lora import file_metadata, find_loras
        return [{"name": name, "alias": name, "path": str(path), "metadata": file_metadata(path)}
                for name, path in find_loras(server.lora_dir).items()]

    @router.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        return {}  # the folder is read on every request

    @router.get("/sdapi/v1/embeddings")
    async def embeddings():
        return await _embeddings(server)

    @router.get("/sdapi/v1/scripts")
    async def scripts_list():
        return {"txt2img": scripts.names("txt2img"), "img2img": scripts.names("img2img")}

    @router.get("/sdapi/v1/script-info")
    async def script_info():
        return scripts.script_info()

    @router.get("/sdapi/v1/prompt-styles")
    async def prompt_styles():
        if server.styles_file is None:
            return []
        try:
            found = read_styles(server.styles_file)
        except ValueError as e:  # the file was changed into something unreadable since the start
            raise api.BadRequest(str(e)) from None
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in found.values()]

    return router


async def _embeddings(server: Server) -> dict:
    """A1111's embeddings answer: the folder's embeddings that fit the current model, and the ones that do not."""
    if server.embeddings_dir is None:
        return {"loaded": {}, "skipped": {}}
    from plainsd.embeddings import load_embeddings
    engine = await asyncio.to_thread(server.store.model)
    found = await asyncio.to_thread(load_embeddings, server.embeddings_dir, engine.sd)
    loaded = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                     "shape": found.vectors.shape[1], "vectors": found.embeddings[name].vectors.shape[0]}
              for name in found.names}
    return {"loaded": loaded, "skipped": {k: {} for k in found.skipped}}


# --- settings and information ------------------------------------------------------------------------------

def _settings_routes(server: Server) -> APIRouter:
    router, store, options = APIRouter(), server.store, server.options

    @router.get("/sdapi/v1/options")
    async def get_options():
        return {**options, "sd_model_checkpoint": store.current.title,
                "sd_checkpoint_hash": store.current.sha256}

    @router.post("/sdapi/v1/options")
    async def set_options(req: api.OptionsRequest):
        values = req.model_dump()
        api.clip_skip_setting(values)
        api.checkpoints_limit_setting(values)
        for name in api.TOKEN_MERGING:
            api.token_merging_ratio(values, name)
        # (outdir_samples stays where the server was started with: a client does not choose where files go)
        api.check_settings(values, {**options, "sd_checkpoint_hash": store.current.sha256}, "options")
        api.check_setting_values({**options, **values}, server.limits, store.backend)
        if "sd_vae" in values:
            _vae(store, values["sd_vae"], store.current)
        if "sd_model_checkpoint" in values:
            store.select(_find(store, values.pop("sd_model_checkpoint")).name)
        options.update(values)
        return None

    @router.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        return {"api": True, "nowebui": False, "listen": False, "api_auth": server.authenticated}

    @router.get("/sdapi/v1/memory")
    async def memory():
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"ram": {"peak_rss": rss}, "cuda": {"error": "no GPU: plainsd runs on the CPU"}}

    @router.post("/sdapi/v1/png-info", response_model=api.PngInfoResponse)
    async def png_info(req: api.PngInfoRequest):
        return api.png_info(req, server.limits)

    return router


# --- the ControlNet extension's routes ----------------------------------------------------------------------

def _controlnet_routes(server: Server) -> APIRouter:
    """The routes of A1111's ControlNet extension (Mikubill/sd-webui-controlnet), answered as it answers."""
    router = APIRouter()

    @router.get("/controlnet/version")
    async def version():
        return {"version": controlnet.API_VERSION}

    @router.get("/controlnet/model_list")
    async def model_list(update: bool = True):
        # (the folder is read on every call: the list is always up to date, as update asks)
        return {"model_list": await asyncio.to_thread(controlnet.model_names, server.controlnet_dir)}

    @router.get("/controlnet/module_list")
    async def module_list(alias_names: bool = False):
        return controlnet.module_list(alias_names)

    @router.get("/controlnet/settings")
    async def settings():
        return {"control_net_unit_count": server.options["control_net_unit_count"]}

    @router.post("/controlnet/detect")
    async def detect(req: controlnet.DetectRequest):
        def decode(data, what):
            return api.decode_image(data, what, server.limits)
        try:
            images = await asyncio.to_thread(controlnet.detect, req, decode)
        except ValueError as e:  # (a bad image's BadRequest included)
            raise api.BadRequest(str(e)) from None
        return {"info": "Success", "images": [api.encode_png(image) for image in images]}

    return router


# --- the web page ---------------------------------------------------------------------------------------

def _page_routes(server: Server) -> APIRouter:
    router = APIRouter()
    page = resources.files("plainsd.server").joinpath("page.html").read_text(encoding="utf-8")

    @router.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @router.get("/plainsd/defaults")
    async def defaults():
        """What the page pre-fills: the current model's own recommended settings."""
        entry = server.store.current
        engine = await asyncio.to_thread(server.store.model, entry)
        merged = pipeline.recommended(engine)
        size = engine.sd.config.resolution
        return {"steps": merged["steps"], "sampler": merged["sampler"], "schedule": merged["schedule"],
                "cfg_scale": merged["cfg_scale"], "width": merged.get("width", size),
                "height": merged.get("height", size), "model": entry.title}

    @router.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    return router


def _checkpoints(store: ModelStore, request_entry, vae_setting: str | None = None) -> Checkpoints:
    """The server's models, for an X/Y/Z plot's Checkpoint name and Refiner checkpoint axes: found by name, loaded
    one at a time, each with the VAE the sd_vae setting gives it; and its VAEs, for the VAE axis (the request's
    model, request_entry, where no Checkpoint name axis chooses one)."""
    return Checkpoints(find=store.find, load=lambda entry: _drawing(store, entry, _vae(store, vae_setting, entry),
                                                                    vae_setting),
                       file=lambda entry: str(entry.path), vaes=store.vaes,
                       use_vae=lambda engine, setting, entry: _use_setting(store, engine, setting,
                                                                           entry or request_entry))


def _drawing(store: ModelStore, entry, vae: Path | None, setting):
    """The engine of `entry` decoding with `vae` (_vae), and giving a refiner the VAE the sd_vae setting gives its
    checkpoint (runtime.Engine.vae_for), as A1111 resolves sd_vae for each checkpoint it loads."""
    engine = store.get(entry, vae)
    engine.vae_for = _refiner_vae(store, setting)
    return engine


def _use_setting(store: ModelStore, engine, setting, entry) -> None:
    """The X/Y/Z plot's VAE axis: an engine get() gave decoding with the VAE the sd_vae setting gives its model
    (entry), and giving a refiner the one it gives the refiner."""
    store.use_vae(engine, _vae(store, setting, entry))
    engine.vae_for = _refiner_vae(store, setting)


def _refiner_vae(store: ModelStore, setting):
    """checkpoint -> the VAE file the sd_vae setting gives it (runtime.Engine.vae_for)."""
    return lambda checkpoint: vaes.resolve(setting, checkpoint, store.vaes())


def _vae(store: ModelStore, setting, entry):
    """The VAE file the sd_vae setting asks for with this model (None: its own); one sentence if it names none."""
    try:
        vaes.check_setting(setting, store.vaes())
        return store.vae_for(setting, entry)
    except ValueError as e:
        raise api.BadRequest(f"sd_vae: {e}") from None


def _find(store: ModelStore, name):
    try:
        return store.find(name)
    except ValueError as e:
        raise api.BadRequest(str(e)) from None


def _grid(images):
    from plainsd.images import contact_sheet
    return images[0] if len(images) == 1 else contact_sheet(images, columns=min(4, len(images)))


class _BasicAuth:
    """HTTP basic auth on every route, as plain ASGI middleware (it leaves disconnect detection intact)."""

    def __init__(self, app, credentials: list[tuple[str, str]]):
        self.app, self.credentials = app, credentials

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            header = headers.get(b"authorization", b"").decode("latin-1")
            if not _authorised(header, self.credentials):
                response = JSONResponse({"detail": "authentication required (HTTP basic auth)"}, status_code=401,
                                        headers={"WWW-Authenticate": 'Basic realm="plainsd"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _parse_auth(auth: str | None) -> list[tuple[str, str]]:
    if not auth:
        return []
    pairs = []
    for item in auth.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("--api-auth takes user:password (several separated by commas)")
        pairs.append((user, password))
    return pairs


def _authorised(header: str | None, credentials: list[tuple[str, str]]) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    ok = False
    for u, p in credentials:  # compare with every pair, in constant time
        ok |= secrets.compare_digest(u.encode(), user.encode()) & secrets.compare_digest(p.encode(), password.encode())
    return ok


def _jsonable(errors):
    return [{k: (list(v) if isinstance(v, tuple) else v if isinstance(v, (str, int, float, list, type(None)))
                 else str(v)) for k, v in e.items()} for e in errors]
