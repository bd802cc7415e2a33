"""Checkpoint loading and saving: layouts, dtypes, EMA, detection, clear errors, other tools reading our files."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import plainsd
from plainsd.config import preset
from plainsd.models import StableDiffusion
from plainsd.weights import CheckpointError, TensorSource, _v_by_weights, infer_config, original_state_dict
from tests.reference import diffusers_from_our_file, diffusers_unet_kwargs, diffusers_vae_kwargs, hf_text_kwargs, max_diff


def _bare_file(sd, path, drop=(), add=None):
    """An original-layout file as other tools write it: no plainsd metadata."""
    state = {k: v.contiguous() for k, v in original_state_dict(sd).items() if k not in drop}
    state.update(add or {})
    save_file(state, str(path))
    return path


def _outputs(sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = sd.tokenizer(["a red circle", "a blue square on the left"])
    x = torch.randn(2, sd.config.unet.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        ctx = sd.text_encoder(ids)
        return ctx, sd.unet(x, torch.tensor([1, 999]), ctx), sd.vae.decode(torch.randn(1, 4, 8, 8, generator=g))


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-v", "tiny-inpaint"])
def test_save_load_round_trip(tmp_path, name):
    sd = plainsd.build(name, seed=1)
    plainsd.save(sd, tmp_path / "m.safetensors")
    back = plainsd.load(tmp_path / "m.safetensors")
    assert back.config == sd.config and back.name == "m"
    for a, b in zip(_outputs(sd), _outputs(back)):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))


def test_saved_keys_are_the_original_layout(tmp_path):
    from safetensors import safe_open

    plainsd.save(plainsd.build("tiny"), tmp_path / "a.safetensors")
    plainsd.save(plainsd.build("tiny-sd2"), tmp_path / "b.safetensors")
    a = set(safe_open(str(tmp_path / "a.safetensors"), "pt").keys())
    b = set(safe_open(str(tmp_path / "b.safetensors"), "pt").keys())
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in a
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in a
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in a
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in b
    assert "cond_stage_model.model.text_projection" in b and "cond_stage_model.model.positional_embedding" in b


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_float32(tmp_path, dtype):
    sd = plainsd.build("tiny", seed=2)
    plainsd.save(sd, tmp_path / "h.safetensors", dtype=dtype)
    back = plainsd.load(tmp_path / "h.safetensors")
    assert back.dtype == torch.float32
    w = sd.unet.out[2].weight
    assert torch.equal(back.unet.out[2].weight, w.to(dtype).float())
    assert plainsd.load(tmp_path / "h.safetensors", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_ckpt_loads_with_weights_only(tmp_path):
    sd = plainsd.build("tiny", seed=3)
    torch.save({"state_dict": original_state_dict(sd), "global_step": 1234, "epoch": 3}, tmp_path / "m.ckpt")
    back = plainsd.load(tmp_path / "m.ckpt")
    assert torch.equal(back.unet.out[2].weight, sd.unet.out[2].weight)


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/plainsd_pwned_marker", "w"))


def test_ckpt_with_code_is_refused_without_running_it(tmp_path):
    import os

    marker = "/tmp/plainsd_pwned_marker"
    if os.path.exists(marker):
        os.remove(marker)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="never runs pickled code"):
        plainsd.load(tmp_path / "evil.ckpt")
    assert not os.path.exists(marker)


def test_ema_weights(tmp_path):
    sd = plainsd.build("tiny", seed=4)
    state = original_state_dict(sd)
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1.0 for k, v in state.items() if k.startswith("model.diffusion_model.")}
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(100, dtype=torch.int32)
    path = _bare_file(sd, tmp_path / "ema.safetensors", add=ema)
    live = plainsd.load(path)
    assert torch.equal(live.unet.out[2].weight, sd.unet.out[2].weight)  # A1111's default: the live weights
    with_ema = plainsd.load(path, ema=True)
    assert torch.equal(with_ema.unet.out[2].weight, sd.unet.out[2].weight + 1.0)
    no_ema = _bare_file(sd, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        plainsd.load(no_ema, ema=True)


def test_detects_sd2_inpainting_and_prediction_override(tmp_path):
    sd1 = plainsd.load(_bare_file(plainsd.build("tiny-inpaint"), tmp_path / "inp.safetensors"))
    assert sd1.config.unet.in_channels == 9 and sd1.config.text.layout == "openai" and sd1.config.text.pad == "eot"
    sd2 = plainsd.load(_bare_file(plainsd.build("tiny-sd2"), tmp_path / "sd2.safetensors"))
    assert sd2.config.text.layout == "openclip" and sd2.config.unet.use_linear_proj and sd2.config.prediction == "eps"
    assert sd2.tokenizer.pad_id == 0
    assert plainsd.load(tmp_path / "sd2.safetensors", prediction="v").config.prediction == "v"
    marked = _bare_file(plainsd.build("tiny-sd2"), tmp_path / "vm.safetensors", add={"v_pred": torch.tensor([])})
    assert plainsd.load(marked).config.prediction == "v"
    assert plainsd.load(marked, prediction="eps").config.prediction == "eps"
    with pytest.raises(ValueError, match="'eps', 'v' or 'x0', got 'sample'"):
        plainsd.load(marked, prediction="sample")


def _meta_shapes(name):
    with torch.device("meta"):
        sd = StableDiffusion(preset(name))
    return {k: tuple(v.shape) for k, v in original_state_dict(sd).items()}


@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd21", "sd2-inpaint"])
def test_full_size_configs_are_recognised_from_shapes(name):
    config, v_key = infer_config(_meta_shapes(name), {})
    want = preset(name)
    assert config.unet == want.unet and config.vae == want.vae
    assert config.text == want.text
    assert (v_key is not None) == (name == "sd21")  # only SD2 non-inpainting models can be v


def test_v_prediction_is_read_from_the_weights():
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    spread = TensorSource({key: (320,)}, lambda k: torch.linspace(-0.3, 0.3, 320), {})
    flat = TensorSource({key: (320,)}, lambda k: torch.linspace(-0.03, 0.03, 320), {})
    assert _v_by_weights(spread, key) and not _v_by_weights(flat, key)


# --- clear errors, never a partial load ---------------------------------------------------------

def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    sd = plainsd.build("tiny", seed=5)
    plainsd.save(sd, tmp_path / "ok.safetensors")
    missing = "model.diffusion_model.out.2.bias"
    with pytest.raises(CheckpointError, match=r"1 tensors missing \(model\.diffusion_model\.out\.2\.bias\)"):
        plainsd.load(_bare_file(sd, tmp_path / "m.safetensors", drop=[missing]))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(model\.diffusion_model\.extra\.weight\)"):
        plainsd.load(_bare_file(sd, tmp_path / "u.safetensors", add={"model.diffusion_model.extra.weight": torch.zeros(2)}))
    state = {k: v.contiguous() for k, v in original_state_dict(sd).items()}
    state["first_stage_model.quant_conv.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "s.safetensors"), metadata={"plainsd.config": sd.config.to_json()})
    with pytest.raises(CheckpointError, match=r"wrong shape \(first_stage_model\.quant_conv\.bias: file \[3\], model \[8\]\)"):
        plainsd.load(tmp_path / "s.safetensors")


def test_truncated_and_foreign_files(tmp_path):
    plainsd.save(plainsd.build("tiny"), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        plainsd.load(tmp_path / "cut.safetensors")
    (tmp_path / "noise.safetensors").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CheckpointError, match="not a readable .safetensors file"):
        plainsd.load(tmp_path / "noise.safetensors")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        plainsd.load(tmp_path / "photo.png")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only 0 bytes"):
        plainsd.load(tmp_path / "empty.ckpt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        plainsd.load(tmp_path / "nothing.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        plainsd.load(tmp_path / "folder")


def test_lora_and_sdxl_files_are_named(tmp_path):
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(CheckpointError, match="looks like a LoRA"):
        plainsd.load(tmp_path / "l.safetensors")
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="SDXL"):
        plainsd.load(tmp_path / "x.safetensors")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import plainsd.weights as w

    def failing(state, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(w, "save_file", failing)
    with pytest.raises(OSError):
        plainsd.save(plainsd.build("tiny"), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=".safetensors files only"):
        plainsd.save(plainsd.build("tiny"), tmp_path / "m.ckpt")


def test_saved_files_follow_the_umask(tmp_path):
    """safetensors alone creates owner-only files (0600); a saved model is as readable as any other file."""
    import os
    import stat

    from plainsd.weights import write_safetensors

    old = os.umask(0o022)
    try:
        out = plainsd.save(plainsd.build("tiny"), tmp_path / "m.safetensors")
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        os.umask(0o077)
        assert stat.S_IMODE(write_safetensors({"x": torch.zeros(2)}, tmp_path / "x.safetensors").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_default_model_is_explained_when_absent(monkeypatch, tmp_path):
    import plainsd.weights as w

    monkeypatch.setattr(w, "DEFAULT_MODEL", tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="no default model"):
        plainsd.load()


# --- diffusers folders, and diffusers reading what plainsd writes --------------------------------

def test_diffusers_folder_with_bin_files(tmp_path):
    from tests.reference import build_diffusers, write_diffusers_folder

    config = preset("tiny-v")
    unet, vae, text = build_diffusers(config, seed=7)
    folder = write_diffusers_folder(tmp_path / "f", config, unet, vae, text, safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").exists()
    sd = plainsd.load(folder)
    assert sd.config.prediction == "v" and sd.tokenizer.pad_id == 0
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, config.unet.context_dim)
    with torch.no_grad():
        assert max_diff(sd.unet(x, torch.tensor([3]), ctx), unet(x, torch.tensor([3]), encoder_hidden_states=ctx).sample) <= 1e-4


def _check_diffusers_reads(tmp_path, record_parity, name, size=8, dtype=None):
    """dtype=torch.float16 writes a half-size file, of weights first rounded to fp16 so both sides hold the same."""
    from tests.reference import perturb

    sd = plainsd.build(name, seed=11)
    for module in (sd.unet, sd.vae, sd.text_encoder):  # no zero-initialised layers
        perturb(module, 12, scale=0.02)
        if dtype is not None:
            module.to(dtype).float()
    path = plainsd.save(sd, tmp_path / f"{name}.safetensors", dtype=dtype)
    try:
        unet, vae, text = diffusers_from_our_file(path, sd.config)
    finally:
        path.unlink()  # full-size files are 2-5 GB; CI machines have little disk
    ids = sd.tokenizer(["a red circle on the left"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, sd.config.unet.in_channels, size, size, generator=g)
    z = torch.randn(1, 4, size, size, generator=g)
    with torch.no_grad():
        skip = sd.config.text.clip_skip - (sd.config.text.layers - text.config.num_hidden_layers)
        ref_ctx = text(ids, output_hidden_states=True).hidden_states[-skip]
        ref_ctx = text.text_model.final_layer_norm(ref_ctx)
        ctx = sd.text_encoder(ids)
        d = {"text": max_diff(ctx, ref_ctx),
             "unet": max_diff(sd.unet(x, torch.tensor([500]), ctx), unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample),
             "vae": max_diff(sd.vae.decode(z), vae.decode(z).sample)}
    for part, value in d.items():
        record_parity(f"plainsd.save -> diffusers converters, {name} {part}", value)
    assert max(d.values()) <= 1e-4, d


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-inpaint"])
def test_diffusers_reads_what_plainsd_writes(tmp_path, record_parity, name):
    _check_diffusers_reads(tmp_path, record_parity, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_diffusers_reads_full_size_files(tmp_path, record_parity, name):
    _check_diffusers_reads(tmp_path, record_parity, name, size=16, dtype=torch.float16)


def test_import_plainsd_does_not_import_references():
    code = ("import sys, plainsd, plainsd.weights; "
            "print([m for m in ('diffusers', 'transformers', 'open_clip', 'k_diffusion') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_turbo_files_get_few_step_defaults(tmp_path):
    """SD-Turbo is recognised by its file name, by ModelSpec metadata, or by Stability's sgm layout with
    denoiser.sigmas (as sd_turbo.safetensors is stored), which loads to the same weights as the original layout;
    a file's own plainsd.defaults win, and an ordinary file gets none."""
    from plainsd.weights import TURBO_DEFAULTS, TEXT_OPENCLIP, SGM_TEXT_OPENCLIP

    sd = plainsd.build("tiny-sd2", seed=0)
    plain = plainsd.load(_bare_file(sd, tmp_path / "plain.safetensors"))
    assert plain.defaults == {}
    assert plainsd.load(_bare_file(sd, tmp_path / "sd_turbo.safetensors")).defaults == TURBO_DEFAULTS
    state = {k: v.contiguous() for k, v in original_state_dict(sd).items()}
    save_file(state, str(tmp_path / "spec.safetensors"), {"modelspec.architecture": "stable-diffusion-v2-turbo"})
    assert plainsd.load(tmp_path / "spec.safetensors").defaults == TURBO_DEFAULTS
    sgm = {(SGM_TEXT_OPENCLIP + k[len(TEXT_OPENCLIP):] if k.startswith(TEXT_OPENCLIP) else k): v for k, v in state.items()}
    sgm["denoiser.sigmas"] = torch.ones(1000)
    save_file(sgm, str(tmp_path / "model.safetensors"))
    loaded = plainsd.load(tmp_path / "model.safetensors")
    assert loaded.defaults == TURBO_DEFAULTS
    assert loaded.config == plain.config
    assert all(torch.equal(a, b) for a, b in zip(_outputs(plain), _outputs(loaded)))
    sd.defaults = {"steps": 3}
    plainsd.save(sd, tmp_path / "my_turbo.safetensors")
    assert plainsd.load(tmp_path / "my_turbo.safetensors").defaults == {"steps": 3}


def test_a_with_lora_set_is_kept_and_foreign_entries_are_dropped(tmp_path):
    """plainsd.defaults may carry a with_lora set (a LoRA by name and its settings): saved and loaded as it is;
    entries neither set knows, and a set that names no LoRA or no sampler, are left out."""
    sd = plainsd.build("tiny", seed=0)
    few = {"lora": "x.lcm", "steps": 4, "sampler": "LCM", "cfg_scale": 1.0}
    sd.defaults = {"steps": 20, "with_lora": {**few, "eta": 2}, "colour": "red"}
    plainsd.save(sd, tmp_path / "a.safetensors")
    assert plainsd.load(tmp_path / "a.safetensors").defaults == {"steps": 20, "with_lora": few}
    sd.defaults = {"steps": 20, "with_lora": {"lora": "x.lcm", "steps": 4}}  # (no sampler to choose it by)
    plainsd.save(sd, tmp_path / "b.safetensors")
    assert plainsd.load(tmp_path / "b.safetensors").defaults == {"steps": 20}
