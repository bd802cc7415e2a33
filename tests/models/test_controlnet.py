"""The ControlNet gives diffusers' ControlNetModel residuals on the same weights (plainsd loading the folder
diffusers' save_pretrained writes), and the UNet given them gives UNet2DConditionModel's output with
down_block_additional_residuals / mid_block_additional_residual: at a conditioning scale, and in guess mode as
diffusers' ControlNet pipeline applies it."""

import json

import pytest
import torch

from plainsd.config import preset
from plainsd.models.controlnet import ControlNet
from plainsd.models.sdxl import SIZE_EMBED_DIM, size_numbers, vector
from plainsd.weights import CheckpointError, load_controlnet
from tests.reference import max_diff, perturb, unet_pair
from tests.test_configs import test_config

TOL = 1e-4


def _controlnets(folder, unet, seed=0, safe=True, config=None, **from_unet):
    """diffusers' ControlNetModel copied from its UNet (ControlNetModel.from_unet), perturbed (so that the zero
    convolutions are not zero), written by save_pretrained with `config` changed in its config.json, read back by
    diffusers and by plainsd.load_controlnet."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    perturb(ControlNetModel.from_unet(unet, **from_unet), seed + 2).save_pretrained(folder, safe_serialization=safe)
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return ControlNetModel.from_pretrained(folder).eval(), load_controlnet(folder)


def _inputs(cfg, size=16, hint_channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, size, size, generator=g)
    hint = torch.rand(2, hint_channels, 8 * size, 8 * size, generator=g)  # a picture in [0, 1], 8x the latent
    return x, hint, torch.tensor([10, 900]), torch.randn(2, 77, cfg.context_dim, generator=g)


def _vectors(cfg, seed=0) -> tuple[dict, dict]:
    """An SDXL network's vector for two rows, as diffusers gets it (added_cond_kwargs: pooled text and time ids)
    and as plainsd does (y); nothing for SD 1.x / 2.x."""
    if cfg.adm_in_channels <= 0:
        return {}, {}
    pooled = torch.randn(2, cfg.adm_in_channels - 6 * SIZE_EMBED_DIM, generator=torch.Generator().manual_seed(seed))
    numbers = torch.tensor([size_numbers("base", 1024, 768), size_numbers("base", 832, 1216, 64, 32)])
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": numbers}}, {"y": vector(pooled, numbers)}


def _compare(theirs, ours, record_parity, name, scale=0.7, hint_channels=3, tol=TOL):
    """Residuals at conditioning scale `scale` and the UNet's output with them, plainsd against diffusers."""
    (dunet, dcn), (unet, cn) = theirs, ours
    x, hint, t, ctx = _inputs(unet.config, hint_channels=hint_channels)
    added, y = _vectors(unet.config)
    with torch.no_grad():
        down, mid = dcn(x, t, ctx, hint, conditioning_scale=scale, return_dict=False, **added)
        residuals = cn(x, hint, t, ctx, **y)
        expected = dunet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, **added).sample
        got = unet(x, t, ctx, control=[r * scale for r in residuals], **y)
        plain = unet(x, t, ctx, **y)
    assert len(residuals) == len(down) + 1 == len(unet.input_blocks) + 1
    # relative to the largest value: the residuals of big random networks run to the thousands
    d_res = max(max_diff(a * scale, b) / max(1.0, float(b.abs().max())) for a, b in zip(residuals, [*down, mid]))
    d_out = max_diff(got, expected)
    record_parity(f"ControlNet {name} residuals vs diffusers (relative)", d_res)
    record_parity(f"UNet + ControlNet {name} vs diffusers", d_out)
    assert d_res <= tol and d_out <= tol, (d_res, d_out)
    assert max_diff(got, plain) > 100 * tol  # the residuals change the output: a dropped one would show
    return residuals


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-deep"])
def test_controlnet_and_controlled_unet_match_diffusers(tmp_path, record_parity, name):
    dunet, unet = unet_pair(test_config(name).unet)
    dcn, cn = _controlnets(tmp_path / "cn", dunet)
    assert cn.config == unet.config and cn.name == "cn" and not cn.global_pool
    _compare((dunet, dcn), (unet, cn), record_parity, name)


def test_sdxl_controlnet_matches_diffusers(tmp_path, record_parity):
    """An SDXL ControlNet (diffusers' text_time: the vector of pooled text and sizes, per-level depth, no
    attention on the first level), from a save_pretrained folder and from its weights as one file in diffusers'
    names (how A1111 users keep diffusers' SDXL ControlNets)."""
    from safetensors.torch import save_file

    dunet, unet = unet_pair(preset("tiny-sdxl").unet)
    dcn, cn = _controlnets(tmp_path / "cn", dunet)
    assert cn.config == unet.config and hasattr(cn, "label_emb")
    _compare((dunet, dcn), (unet, cn), record_parity, "tiny-sdxl")
    save_file(dcn.state_dict(), str(tmp_path / "diffusers_xl_canny.safetensors"))
    single = load_controlnet(tmp_path / "diffusers_xl_canny.safetensors")
    assert single.config == unet.config
    _compare((dunet, dcn), (unet, single), record_parity, "tiny-sdxl (one file, diffusers' names)")


def test_sdxl_controlnets_with_fewer_transformer_blocks(tmp_path, record_parity):
    """SDXL ControlNets with fewer transformer blocks than the UNet they steer, as diffusers' smaller ones (none on
    some levels: a transformer of norm and projections alone); their residuals are the same sizes."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    dunet, unet = unet_pair(preset("tiny-sdxl").unet)
    config = {k: v for k, v in ControlNetModel.from_unet(dunet).config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    perturb(ControlNetModel(**{**config, "transformer_layers_per_block": [0, 0, 1]}), 3).save_pretrained(tmp_path)
    dcn, cn = ControlNetModel.from_pretrained(tmp_path).eval(), load_controlnet(tmp_path)
    assert cn.config.transformer_depth == (0, 0, 1) and not cn.input_blocks[3][1].transformer_blocks
    _compare((dunet, dcn), (unet, cn), record_parity, "tiny-sdxl, fewer transformer blocks")
    # none in the middle either: a folder says the text width, a single file's tensors cannot
    perturb(ControlNetModel(**{**config, "transformer_layers_per_block": 0}), 3).save_pretrained(tmp_path / "none")
    assert load_controlnet(tmp_path / "none").config.transformer_depth == 0
    save_file(ControlNetModel.from_pretrained(tmp_path / "none").state_dict(), str(tmp_path / "none.safetensors"))
    with pytest.raises(CheckpointError, match="middle block has no transformer blocks.*from a diffusers folder"):
        load_controlnet(tmp_path / "none.safetensors")


def test_an_sdxl_controlnet_needs_the_vector():
    cn = ControlNet(preset("tiny-sdxl").unet)
    x, hint, t, ctx = _inputs(cn.config, size=8)
    with pytest.raises(ValueError, match=r"an SDXL ControlNet needs the vector y \[B, 1632\]"):
        cn(x, hint, t, ctx)
    with pytest.raises(ValueError, match=r"this ControlNet takes no vector y"):
        ControlNet(test_config("tiny").unet)(*_inputs(test_config("tiny").unet, size=8), y=torch.zeros(2, 4))


def test_bin_folders_load_too(tmp_path, record_parity):
    dunet, unet = unet_pair(test_config("tiny").unet)
    dcn, cn = _controlnets(tmp_path / "cn", dunet, safe=False)
    assert (tmp_path / "cn" / "diffusion_pytorch_model.bin").is_file()
    _compare((dunet, dcn), (unet, cn), record_parity, "tiny (.bin folder)")


@pytest.mark.parametrize("setting", ["global_pool_conditions", "bgr", "one hint channel"])
def test_diffusers_settings_plainsd_honours(tmp_path, record_parity, setting):
    """Shuffle models (global_pool_conditions: each residual averaged over the picture), a hint in BGR order
    (the first convolution's input channels turned around at load) and a one-channel hint."""
    dunet, unet = unet_pair(test_config("tiny").unet)
    config = {"global_pool_conditions": {"global_pool_conditions": True},
              "bgr": {"controlnet_conditioning_channel_order": "bgr"}}.get(setting)
    channels = 1 if setting == "one hint channel" else 3
    dcn, cn = _controlnets(tmp_path / "cn", dunet, config=config, conditioning_channels=channels)
    residuals = _compare((dunet, dcn), (unet, cn), record_parity, f"tiny ({setting})", hint_channels=channels)
    assert cn.global_pool == (setting == "global_pool_conditions") and cn.hint_channels == channels
    assert (residuals[0].shape[-2:] == (1, 1)) == cn.global_pool


def test_guess_mode_as_diffusers_pipeline_applies_it(tmp_path, record_parity):
    """diffusers' ControlNet pipeline in guess mode with CFG: the ControlNet runs on the conditional half only,
    its residuals scaled by logspace(-1, 0) (0.1 for the first skip to 1 for the middle) times the conditioning
    scale, and the unconditional half gets zeros."""
    dunet, unet = unet_pair(test_config("tiny").unet)
    dcn, cn = _controlnets(tmp_path / "cn", dunet)
    x, hint, _, ctx = _inputs(unet.config)
    latents, t, scale = x[:1], torch.tensor(500), 0.8
    both = torch.cat([latents, latents])  # [uncond, cond], as the pipeline orders them
    with torch.no_grad():
        down, mid = dcn(latents, t, ctx[1:], hint[:1], conditioning_scale=scale, guess_mode=True, return_dict=False)
        expected = dunet(both, t, encoder_hidden_states=ctx, return_dict=False,
                         down_block_additional_residuals=[torch.cat([torch.zeros_like(d), d]) for d in down],
                         mid_block_additional_residual=torch.cat([torch.zeros_like(mid), mid]))[0]
        residuals = cn(latents, hint[:1], t, ctx[1:])
        scales = torch.logspace(-1, 0, len(residuals)) * scale
        got = unet(both, t, ctx, control=[torch.cat([torch.zeros_like(r), r * s]) for r, s in zip(residuals, scales)])
        flat = unet(both, t, ctx, control=[torch.cat([torch.zeros_like(r), r * scale]) for r in residuals])
    d = max_diff(got, expected)
    record_parity("UNet + ControlNet tiny, guess mode vs diffusers", d)
    assert d <= TOL and max_diff(flat, expected) > 100 * TOL


def test_hint_of_the_wrong_size_is_refused():
    cn = ControlNet(test_config("tiny").unet)
    with pytest.raises(ValueError, match=r"hint must be \[B, 3, 64, 64\]"):
        cn(torch.randn(1, 4, 8, 8), torch.rand(1, 3, 32, 32), 1, torch.randn(1, 77, 128))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_controlnet_matches_diffusers(tmp_path, record_parity, name):
    """SD1.5-size (and SD2.x-size: head size 64, linear projections, 1024-wide text) networks, float32."""
    dunet, unet = unet_pair(test_config(name).unet)
    dcn, cn = _controlnets(tmp_path / "cn", dunet)
    for f in (tmp_path / "cn").iterdir():
        f.unlink()  # (1.4 GB; the weights are in memory now)
    assert cn.config == unet.config
    _compare((dunet, dcn), (unet, cn), record_parity, name, tol=1e-3)


@pytest.mark.slow
def test_full_size_sdxl_controlnet_matches_diffusers(record_parity):
    """SDXL size: diffusers' ControlNetModel.from_unet (1.25B parameters) beside the 2.6B UNet it steers. plainsd's
    networks hold diffusers' own tensors, renamed as load_controlnet renames a diffusers file, so each network is
    in memory once (15 GB in float32); the weights are perturbed by 0.005, as the full-size SDXL UNet's
    (tests/models/test_sdxl.py). Reading the files is tested at tiny size above."""
    from diffusers import ControlNetModel

    from plainsd.weights import _rename, controlnet_diffusers_names

    cfg = preset("sdxl").unet
    dunet, unet = unet_pair(cfg, shared=True, scale=0.005)
    torch.manual_seed(0)
    dcn = perturb(ControlNetModel.from_unet(dunet), 2, scale=0.005)
    with torch.device("meta"):
        cn = ControlNet(cfg)
    pairs = controlnet_diffusers_names(cfg)
    cn.load_state_dict({_rename(k, pairs): v for k, v in dcn.state_dict().items()}, strict=True, assign=True)
    _compare((dunet, dcn), (unet, cn.eval()), record_parity, "sdxl, full size", tol=1e-3)
