"""Configs for the tests: the presets, plus a deeper tiny UNet that exercises more of the layout."""

import dataclasses

import pytest

import plainsd
from plainsd.config import ModelConfig, UNetConfig, preset


def test_config(name: str) -> ModelConfig:
    if name == "tiny-deep":  # 3 levels, 2 ResBlocks each, no attention on the last level, depth-2 transformers
        cfg = preset("tiny")
        cfg.unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(0, 1),
                              num_heads=2, context_dim=128, transformer_depth=2)
        return cfg
    if name.endswith("-lcm"):  # an LCM-distilled UNet: LCM-Dreamshaper-v7's guidance embedding (256 wide)
        cfg = preset(name[:-len("-lcm")])
        cfg.unet.time_cond_proj_dim = 256
        return cfg
    return preset(name)


test_config.__test__ = False  # a helper, not a test


def test_presets_have_the_published_sizes():
    sd15, sd21 = preset("sd15"), preset("sd21")
    assert (sd15.text.width, sd15.text.layers, sd15.text.act, sd15.unet.context_dim) == (768, 12, "quick_gelu", 768)
    assert (sd21.text.width, sd21.text.layers, sd21.text.act, sd21.unet.context_dim) == (1024, 24, "gelu", 1024)
    assert sd21.unet.head_dim == 64 and sd21.unet.use_linear_proj and sd15.unet.num_heads == 8
    assert preset("sd21-v").prediction == "v" and preset("sd15-inpaint").unet.in_channels == 9
    assert preset("sd15").vae.factor == 8 and preset("tiny").vae.factor == 8
    assert all(name in plainsd.PRESETS for name in ("sd15", "sd21", "sd21-v", "sd15-inpaint", "tiny"))


def test_sd15_unet_has_860m_parameters():
    from plainsd.models.unet import UNetModel
    import torch

    with torch.device("meta"):
        unet = UNetModel(preset("sd15").unet)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # diffusers' SD1.5 UNet count


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known presets: sd15"):
        preset("sd99")


def test_config_json_round_trip():
    cfg = test_config("tiny-deep")
    assert ModelConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    assert ModelConfig.from_dict(__import__("json").loads(cfg.to_json())) == cfg
