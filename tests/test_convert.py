"""plainsd convert: .ckpt -> .safetensors, single file <-> diffusers folder (read by diffusers' own from_pretrained),
fp16 / bf16 within the stated tolerance, EMA and pruning, metadata, the check, refusals and the command line."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import plainsd
from plainsd.cli import main
from plainsd.convert import TOLERANCE, CheckFailed, convert, output_kind
from plainsd.models.sdxl import size_numbers, vector
from plainsd.weights import CheckpointError, original_state_dict
from tests.reference import max_diff, perturb

# (no "!": SD 2.x's tokenizer files, diffusers' own too, make "!" the padding token, which transformers' CLIPTokenizer
# then reads as id 0 wherever a prompt has it, where OpenCLIP's tokenizer reads the word "!")
PROMPT = "a red circle on the left, (blue) square; 4k"


def _model(name, seed=1):
    """A tiny model with every weight perturbed, so that zero-initialised layers cannot hide a wrong mapping."""
    return perturb(plainsd.build(name, seed=seed), seed + 1, scale=0.02)


def _file(sd, path, **extra):
    """An original-layout file as other tools write it (no plainsd metadata), with extra tensors."""
    state = {k: v.contiguous() for k, v in original_state_dict(sd).items()}
    save_file({**state, **extra}, str(path))
    return path


def _outputs(sd, size=8):
    """Text states (and SDXL's pooled text), a UNet call and a VAE decode on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    ids = sd.tokenizer([PROMPT])
    x = torch.randn(1, sd.config.unet.in_channels, size, size, generator=g)
    z = torch.randn(1, 4, size, size, generator=g)
    with torch.no_grad():
        if sd.config.sdxl:
            ctx, pooled = sd.text_encoder.encode(ids)
            y = vector(pooled, torch.tensor([size_numbers(sd.config.sdxl, 64, 64)]))
            return [ctx, pooled, sd.unet(x, torch.tensor([500]), ctx, y=y), sd.vae.decode(z)]
        ctx = sd.text_encoder(ids)
        return [ctx, sd.unet(x, torch.tensor([500]), ctx), sd.vae.decode(z)]


# --- .ckpt -> .safetensors ------------------------------------------------------------------------

def test_ckpt_to_safetensors_keeps_the_model_only(tmp_path):
    """A1111's .ckpt: the state_dict wrapper, EMA copies, optimizer states and the step count; the result holds the
    model's tensors, bit for bit, and nothing else."""
    sd = _model("tiny")
    state = original_state_dict(sd)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v * 1.01 for k, v in state.items()
           if k.startswith("model.diffusion_model.")}
    torch.save({"state_dict": {**state, **ema, "model_ema.decay": torch.tensor(0.9999)}, "global_step": 470000,
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}]}, tmp_path / "m.ckpt")
    result = convert(tmp_path / "m.ckpt", tmp_path / "m.safetensors")
    written = load_file(str(tmp_path / "m.safetensors"))
    assert set(written) == set(state)
    assert all(torch.equal(written[k], v) for k, v in state.items())
    assert len(result.left_out) == len(ema) + 1 and all(k.startswith("model_ema.") for k in result.left_out)
    assert result.dtype == torch.float32 and max(result.differences.values()) == 0.0

    picked = convert(tmp_path / "m.ckpt", tmp_path / "ema.safetensors", ema=True)
    written = load_file(str(tmp_path / "ema.safetensors"))
    assert torch.equal(written["model.diffusion_model.out.2.weight"], state["model.diffusion_model.out.2.weight"] * 1.01)
    assert torch.equal(written["first_stage_model.decoder.conv_out.weight"], state["first_stage_model.decoder.conv_out.weight"])
    assert max(picked.differences.values()) == 0.0


def test_lightning_ckpt_reads_as_in_a1111(tmp_path, monkeypatch):
    """The original SD 1.x .ckpt files hold, besides tensors, Lightning's ModelCheckpoint class as a dict key and
    numpy scalars: weights_only reads them with A1111's allowlist (the class only as a name); code is still refused."""
    import sys
    import types

    import numpy

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module)
    sd = _model("tiny")
    torch.save({"state_dict": original_state_dict(sd), "global_step": numpy.int64(470000), "epoch": numpy.float32(6),
                "callbacks": {ModelCheckpoint: {"best_model_score": None}}}, tmp_path / "sd-v1-4.ckpt")
    monkeypatch.delitem(sys.modules, module.__name__)  # (as where Lightning is not installed)
    convert(tmp_path / "sd-v1-4.ckpt", tmp_path / "m.safetensors")
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["model.diffusion_model.out.2.weight"],
                       sd.unet.out[2].weight)


def test_ema_without_ema_weights_is_refused(tmp_path):
    path = _file(_model("tiny"), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"no EMA weights .*without --ema"):
        convert(path, tmp_path / "out.safetensors", ema=True)
    assert not (tmp_path / "out.safetensors").exists()


def test_metadata_is_kept(tmp_path):
    sd = _model("tiny")
    state = {k: v.contiguous() for k, v in original_state_dict(sd).items()}
    recipe = json.dumps({"type": "webui", "interp_method": "Weighted sum", "multiplier": 0.3})
    save_file(state, str(tmp_path / "merged.safetensors"), {"sd_merge_recipe": recipe, "modelspec.title": "Merged"})
    convert(tmp_path / "merged.safetensors", tmp_path / "half.safetensors", dtype="fp16")
    meta = safe_open(str(tmp_path / "half.safetensors"), "pt").metadata()
    assert meta["sd_merge_recipe"] == recipe and meta["modelspec.title"] == "Merged" and meta["format"] == "pt"
    convert(tmp_path / "half.safetensors", tmp_path / "folder")  # kept in the UNet's file, and back
    convert(tmp_path / "folder", tmp_path / "back.safetensors")
    assert safe_open(str(tmp_path / "back.safetensors"), "pt").metadata()["sd_merge_recipe"] == recipe


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_within_the_stated_tolerance(tmp_path, record_parity, dtype):
    sd = _model("tiny-sd2")
    result = convert(_file(sd, tmp_path / "m.safetensors"), tmp_path / f"{dtype}.safetensors", dtype=dtype)
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    written = load_file(str(result.path))
    state = original_state_dict(sd)
    assert all(t.dtype == want and torch.equal(t, state[k].to(want)) for k, t in written.items())
    for name, value in result.differences.items():
        record_parity(f"convert --dtype {dtype}, {name} (fraction of the largest value)", value)
    assert 0 < max(result.differences.values()) <= TOLERANCE[want] == result.tolerance
    # without --dtype the result keeps the input's (here: this half-precision file's)
    again = convert(result.path, tmp_path / "again", check=False)
    assert again.dtype == want and again.differences == {}
    assert json.loads((tmp_path / "again" / "text_encoder" / "config.json").read_text())["torch_dtype"] == \
        {"fp16": "float16", "bf16": "bfloat16"}[dtype]


# --- single file -> diffusers folder, read by diffusers ---------------------------------------------

def _configs_match(ours, theirs):
    """A config.json we wrote against the one diffusers / transformers write for the model they loaded from it."""
    a, b = json.loads(ours.read_text()), json.loads(theirs.read_text())
    versions = ("_diffusers_version", "transformers_version", "torch_dtype", "dtype", "_name_or_path")
    assert {k: v for k, v in a.items() if k not in versions} == {k: v for k, v in b.items() if k not in versions}


@pytest.mark.parametrize("name", ["tiny", "tiny-v", "tiny-inpaint"])
def test_file_to_diffusers_folder_that_diffusers_loads(tmp_path, record_parity, name):
    from diffusers import DiffusionPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    sd = _model(name)
    convert(plainsd.save(sd, tmp_path / "m.safetensors"), tmp_path / "folder/")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "folder")
    assert type(pipe) is (StableDiffusionInpaintPipeline if name == "tiny-inpaint" else StableDiffusionPipeline)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if name == "tiny-v" else "epsilon")
    for part in ("unet", "vae", "text_encoder"):
        getattr(pipe, part).save_pretrained(tmp_path / "theirs" / part)
        _configs_match(tmp_path / "folder" / part / "config.json", tmp_path / "theirs" / part / "config.json")
    ctx, unet_out, image = _outputs(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, sd.config.unet.in_channels, 8, 8, generator=g)
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():  # (the pipeline's own tokenizer, and its text encoder as its encode_prompt reads it)
        theirs_ctx = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
        d = {"text": max_diff(ctx, theirs_ctx),
             "unet": max_diff(unet_out, pipe.unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample),
             "vae": max_diff(image, pipe.vae.decode(z).sample)}
    for part, value in d.items():
        record_parity(f"convert -> diffusers from_pretrained, {name} {part}", value)
    assert max(d.values()) <= 1e-4, d


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_sdxl_file_to_diffusers_folder_that_diffusers_loads(tmp_path, record_parity, name):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    sd = _model(name)
    convert(_file(sd, tmp_path / "m.safetensors"), tmp_path / "folder")
    refiner = name.endswith("refiner")
    pipe = (StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline).from_pretrained(tmp_path / "folder")
    assert (pipe.text_encoder is None) == refiner and pipe.config.get("requires_aesthetics_score", False) == refiner
    ctx, pooled, unet_out, image = _outputs(sd)
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    numbers = torch.tensor([size_numbers(sd.config.sdxl, 64, 64)])
    with torch.no_grad():
        theirs_ctx, _, theirs_pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
        theirs_unet = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=ctx,
                                added_cond_kwargs={"text_embeds": pooled, "time_ids": numbers}).sample
        d = {"text": max_diff(ctx, theirs_ctx), "pooled": max_diff(pooled, theirs_pooled),
             "unet": max_diff(unet_out, theirs_unet), "vae": max_diff(image, pipe.vae.decode(z).sample)}
    for part, value in d.items():
        record_parity(f"convert -> diffusers from_pretrained, {name} {part}", value)
    assert max(d.values()) <= 1e-4, d


def test_tokenizer_files_read_by_transformers(tmp_path):
    """transformers' CLIPTokenizer on the tokenizer files gives plainsd's ids (SD1: padded with <|endoftext|>, SD2:
    with 0), long prompts truncated alike."""
    from transformers import CLIPTokenizer

    prompts = ["a red circle", "A Photo of an astronaut, riding a horse; 4k", "it's a dog's life (masterpiece:1.2)",
               " ".join(["word"] * 100)]
    for name in ("tiny", "tiny-sd2"):
        sd = plainsd.build(name)
        plainsd.weights.save_diffusers(sd, tmp_path / name)
        texts = prompts + (["wow!! a dog"] if name == "tiny" else [])  # (SD 2.x: see PROMPT)
        theirs = CLIPTokenizer.from_pretrained(tmp_path / name / "tokenizer")
        ids = theirs(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ids, sd.tokenizer(texts))
        assert len(theirs) == 49408


# --- diffusers folder (diffusers' own save_pretrained) -> single file ----------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-sd2"])
def test_diffusers_folder_to_file(tmp_path, record_parity, name):
    from tests.reference import build_diffusers, write_diffusers_folder
    from tests.test_configs import test_config

    config = test_config(name)
    unet, vae, text = build_diffusers(config, seed=5)
    folder = write_diffusers_folder(tmp_path / "folder", config, unet, vae, text)
    result = convert(folder, tmp_path / "m.safetensors")
    assert result.kind == "file" and max(result.differences.values()) == 0.0
    sd = plainsd.load(result.path)
    ctx, unet_out, image = _outputs(sd)
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        theirs_ctx = text(sd.tokenizer([PROMPT])).last_hidden_state  # (as diffusers' pipeline reads the folder)
        d = {"text": max_diff(ctx, theirs_ctx),
             "unet": max_diff(unet_out, unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample),
             "vae": max_diff(image, vae.decode(z).sample)}
    for part, value in d.items():
        record_parity(f"diffusers folder -> convert -> file, {name} {part}", value)
    assert max(d.values()) <= 1e-4, d
    keys = set(safe_open(str(result.path), "pt").keys())
    assert ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys) == (name == "tiny-sd2")


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_sdxl_diffusers_folder_to_file_and_back(tmp_path, name):
    """diffusers' SDXL folder -> file -> folder: the same outputs at each step, the file in Stability's keys."""
    from tests.reference import build_diffusers_sdxl, write_diffusers_sdxl_folder
    from tests.test_configs import test_config

    nets = build_diffusers_sdxl(test_config(name), seed=6)
    folder = write_diffusers_sdxl_folder(tmp_path / "theirs", *nets)
    convert(folder, tmp_path / "m.safetensors")
    convert(tmp_path / "m.safetensors", tmp_path / "ours")
    keys = set(safe_open(str(tmp_path / "m.safetensors"), "pt").keys())
    assert any(k.startswith("conditioner.embedders.0.") for k in keys) and "model.diffusion_model.label_emb.0.0.weight" in keys
    a, b, c = (plainsd.load(p) for p in (folder, tmp_path / "m.safetensors", tmp_path / "ours"))
    for x, y, z in zip(_outputs(a), _outputs(b), _outputs(c)):
        assert torch.equal(x, y) and torch.equal(x, z)


# --- refusals, the check, the command line --------------------------------------------------------------

def test_output_kind_follows_the_suffix(tmp_path):
    assert output_kind("m.safetensors") == "file" and output_kind("models/sdxl-base") == "diffusers"
    assert output_kind("models/v1.5/") == "diffusers"
    (tmp_path / "v1.5").mkdir()
    assert output_kind(tmp_path / "v1.5") == "diffusers"
    with pytest.raises(ValueError, match=r"\.safetensors file or a diffusers folder .*\.ckpt"):
        output_kind("m.ckpt")


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    sd = _model("tiny")
    path = _file(sd, tmp_path / "m.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="exists already; .*--overwrite"):
        convert(path, tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    convert(path, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "mine.txt").exists() and (tmp_path / "out" / "model_index.json").is_file()
    convert(path, path, dtype="fp16", overwrite=True)  # in place
    assert load_file(str(path))["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out"]  # no temporary left behind


def test_failed_check_writes_nothing(tmp_path, monkeypatch, capsys):
    """A result whose outputs differ (here: one tensor spoilt on the way) is not put in place: an existing OUT and
    the input stay as they were; the figure is reported and the command exits 1."""
    import plainsd.convert as conv

    sd = _model("tiny")
    path = _file(sd, tmp_path / "m.safetensors")
    before = path.read_bytes()
    (tmp_path / "out.safetensors").write_bytes(b"old")
    real_save = conv.save

    def spoilt(model, out, **kw):
        with torch.no_grad():
            model.vae.decoder.conv_out.weight.mul_(-1)
        return real_save(model, out, **kw)

    monkeypatch.setattr(conv, "save", spoilt)
    with pytest.raises(CheckFailed, match="vae decode") as e:
        convert(path, tmp_path / "out.safetensors", overwrite=True)
    assert e.value.differences["vae decode"] > 0.1 and e.value.differences["unet"] == 0.0
    assert main(["convert", str(path), str(tmp_path / "out.safetensors"), "--overwrite"]) == 1
    assert "check failed" in capsys.readouterr().err
    assert path.read_bytes() == before and (tmp_path / "out.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "out.safetensors"]
    assert main(["convert", str(path), str(tmp_path / "out.safetensors"), "--overwrite", "--no-check"]) == 0


def test_interrupted_folder_leaves_nothing(tmp_path, monkeypatch):
    import plainsd.weights as w

    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kw)

    real = w.write_safetensors
    monkeypatch.setattr(w, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        w.save_diffusers(_model("tiny"), tmp_path / "folder")
    assert list(tmp_path.iterdir()) == []


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/plainsd_convert_pwned",))


def test_cli_refuses_unsafe_pickles_and_bad_input(tmp_path, capsys):
    marker = "/tmp/plainsd_convert_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": _Evil()}, tmp_path / "evil.ckpt")
    cases = [(["evil.ckpt", "out.safetensors"], "system), which could run code"),
             (["none.ckpt", "out.safetensors"], "no such checkpoint"),
             (["evil.ckpt", "out.ckpt"], "not .ckpt"),
             (["notes.txt", "out.safetensors"], "not a checkpoint"),
             (["evil.ckpt", "no/such/out.safetensors"], "does not exist")]
    (tmp_path / "notes.txt").write_text("not a model at all")
    for argv, message in cases:
        assert main(["convert", *[str(tmp_path / a) for a in argv]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("plainsd: error: ") and message in err and "\n" not in err, err
    assert not os.path.exists(marker)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.ckpt", "notes.txt"]


def test_cli_converts_and_reports(tmp_path, capsys):
    path = plainsd.save(_model("tiny"), tmp_path / "m.safetensors")
    assert main(["convert", str(path), str(tmp_path / "m-diffusers/"), "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "a diffusers folder, bf16" in out and "check passed" in out and "unet" in out
    assert plainsd.load(tmp_path / "m-diffusers").unet.out[2].weight.dtype == torch.float32
    from plainsd.cli import build_parser
    assert "convert" in build_parser().format_help()


def test_lcm_unet_keeps_its_guidance_embedding(tmp_path):
    """An LCM-distilled UNet's guidance-scale projection goes into the folder under diffusers' name, with its width
    in the config; the check (which calls the UNet with a guidance scale) passes and diffusers loads the UNet."""
    from diffusers import UNet2DConditionModel

    from tests.test_configs import test_config

    sd = perturb(plainsd.build(test_config("tiny-lcm"), seed=3), 4, scale=0.02)
    result = convert(plainsd.save(sd, tmp_path / "lcm.safetensors"), tmp_path / "lcm")
    assert result.differences["unet"] == 0.0
    assert json.loads((tmp_path / "lcm" / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 256
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "lcm" / "unet")
    assert torch.equal(unet.time_embedding.cond_proj.weight, sd.unet.time_embedding.cond_proj.weight)
