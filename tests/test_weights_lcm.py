"""LCM-distilled checkpoints: the guidance embedding's key in original single files and diffusers folders,
recognised from the file, loaded strictly, written back in the original layout."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import plainsd
from plainsd.weights import CheckpointError, original_state_dict, read_tensors, infer_config
from tests.reference import perturb
from tests.test_configs import test_config

KEY = "model.diffusion_model.time_embedding.cond_proj.weight"  # what LCM single files carry (models/unet.py)


def _lcm(seed=0):
    return perturb(plainsd.build(test_config("tiny-lcm"), seed=seed), seed)


def _unet_out(sd, guidance):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        return sd.unet(x, torch.tensor([10, 900]), ctx, guidance=guidance)


def test_single_file_without_metadata_is_recognised_and_loads_strictly(tmp_path):
    """A file as other tools write one (no plainsd metadata): the embedding's width comes from its shape."""
    config = test_config("tiny-lcm")
    config.unet.num_heads, config.resolution = 8, 512  # what a file's shapes say of an SD1 UNet
    sd = perturb(plainsd.build(config, seed=0), 0)
    path = tmp_path / "lcm.safetensors"
    save_file({k: v.contiguous() for k, v in original_state_dict(sd).items()}, str(path))
    source = read_tensors(path)
    assert source.shapes[KEY] == (32, 256)
    assert infer_config(source.shapes, source.metadata)[0].unet.time_cond_proj_dim == 256
    back = plainsd.load(path)
    assert back.config == sd.config
    assert torch.equal(_unet_out(back, 7.0), _unet_out(sd, 7.0))


def test_save_writes_the_original_layout_and_round_trips(tmp_path):
    sd = _lcm(1)
    path = plainsd.save(sd, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert KEY in keys and "model.diffusion_model.time_embed.0.weight" in keys
    assert not any(k.startswith("model.diffusion_model.time_embedding.linear") for k in keys)
    back = plainsd.load(path)
    assert back.config.unet.time_cond_proj_dim == 256
    assert torch.equal(_unet_out(back, 3.0), _unet_out(sd, 3.0))


def test_other_models_keep_their_keys(tmp_path):
    plain = plainsd.build("tiny")
    assert plain.config.unet.time_cond_proj_dim == 0
    assert not any("time_embedding" in k for k in original_state_dict(plain))


def test_a_file_missing_the_embedding_says_so(tmp_path):
    """A file whose plainsd metadata says LCM but lacks the projection: named, not loaded half."""
    sd = _lcm()
    path = plainsd.save(sd, tmp_path / "m.safetensors")
    state = {k: v for k, v in original_state_dict(sd).items() if k != KEY}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"SD1, LCM model .*1 tensors missing .*cond_proj"):
        plainsd.load(path)


def test_diffusers_folder_written_by_diffusers_loads(tmp_path):
    """A pipeline folder saved by diffusers' save_pretrained: unet/config.json's time_cond_proj_dim and the key
    time_embedding.cond_proj.weight; the UNet then agrees with diffusers' given the same guidance embedding."""
    from diffusers import LatentConsistencyModelPipeline

    from tests.reference import build_diffusers, max_diff, write_diffusers_folder

    config = test_config("tiny-lcm")
    unet, vae, text = build_diffusers(config, seed=5)
    folder = write_diffusers_folder(tmp_path / "f", config, unet, vae, text)
    assert json.loads((folder / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 256
    sd = plainsd.load(folder)
    assert sd.config.unet.time_cond_proj_dim == 256
    w = torch.tensor([7.0, 7.0])
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g)
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    with torch.no_grad():
        ref = unet(x, torch.tensor([10, 900]), encoder_hidden_states=ctx, timestep_cond=emb).sample
        assert max_diff(sd.unet(x, torch.tensor([10, 900]), ctx, guidance=w), ref) <= 1e-4
