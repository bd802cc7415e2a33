"""The T2I-Adapter gives diffusers' T2IAdapter features on the same weights (plainsd loading the folder diffusers'
save_pretrained writes), and the UNet given them gives UNet2DConditionModel's output with
down_intrablock_additional_residuals, scaled and doubled for CFG as diffusers' adapter pipeline does; SD 1.x / 2.x
adapters ("full_adapter") and SDXL's ("full_adapter_xl", three levels and the middle block)."""

import pytest
import torch

from plainsd.config import AdapterConfig, preset
from plainsd.models.t2i_adapter import T2IAdapter
from plainsd.models.unet import MIDDLE, adapter_taps
from plainsd.weights import load_adapter
from tests.models.test_controlnet import _vectors
from tests.reference import max_diff, perturb, unet_pair
from tests.test_configs import test_config

TOL = 1e-4


def _adapters(folder, cfg, seed=0, hint_channels=3):
    """diffusers' T2IAdapter for this UNet (SDXL's kind for an SDXL UNet), written by save_pretrained, read back by
    plainsd."""
    from diffusers import T2IAdapter as DiffusersAdapter

    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    xl = cfg.adm_in_channels > 0
    torch.manual_seed(seed)
    theirs = perturb(DiffusersAdapter(in_channels=hint_channels, channels=channels + channels[-1:] if xl else channels,
                                      num_res_blocks=2, downscale_factor=16 if xl else 8,
                                      adapter_type="full_adapter_xl" if xl else "full_adapter"), seed + 3)
    theirs.save_pretrained(folder)
    return theirs.eval(), load_adapter(folder)


def _compare(cfg, record_parity, tmp_path, label, hint_channels=3, tol=TOL, size=16):
    dunet, unet = unet_pair(cfg)
    dadapter, adapter = _adapters(tmp_path / "adapter", cfg, hint_channels=hint_channels)
    g = torch.Generator().manual_seed(0)
    hint = torch.rand(1, hint_channels, 8 * size, 8 * size, generator=g)
    x, t = torch.randn(2, cfg.in_channels, size, size, generator=g), torch.tensor([10, 900])
    ctx, scale = torch.randn(2, 77, cfg.context_dim, generator=g), 0.6
    added, y = _vectors(cfg)
    with torch.no_grad():
        theirs = [torch.cat([f * scale] * 2) for f in dadapter(hint)]  # the pipeline: scaled, one copy per CFG half
        expected = dunet(x, t, encoder_hidden_states=ctx, return_dict=False,
                         down_intrablock_additional_residuals=[f.clone() for f in theirs], **added)[0]
        features = adapter(hint)
        got = unet(x, t, ctx, adapter=[torch.cat([f * scale] * 2) for f in features], **y)
        plain = unet(x, t, ctx, **y)
    assert len(features) == len(theirs) and adapter.config.hint_channels == hint_channels
    d_feat = max(max_diff(torch.cat([f * scale] * 2), e) / max(1.0, float(e.abs().max())) for f, e in zip(features, theirs))
    d_out = max_diff(got, expected)
    record_parity(f"T2I-Adapter {label} features vs diffusers (relative)", d_feat)
    record_parity(f"UNet + T2I-Adapter {label} vs diffusers", d_out)
    assert d_feat <= tol and d_out <= tol, (d_feat, d_out)
    assert max_diff(got, plain) > 100 * tol  # the features change the output


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-deep"])
def test_adapter_and_adapted_unet_match_diffusers(tmp_path, record_parity, name):
    _compare(test_config(name).unet, record_parity, tmp_path, name)


def test_grey_hints(tmp_path, record_parity):
    """The sketch adapters read a one-channel picture."""
    _compare(test_config("tiny").unet, record_parity, tmp_path, "tiny", hint_channels=1)


@pytest.mark.parametrize("hint_channels", [3, 1])
def test_sdxl_adapter_and_adapted_unet_match_diffusers(tmp_path, record_parity, hint_channels):
    """SDXL's kind: the hint folded by 16, maps at 1/2, 1/2, 1/4, 1/4 of the latent, the last onto the middle
    block's output (diffusers' FullAdapterXL and its UNet)."""
    cfg = preset("tiny-sdxl").unet
    _compare(cfg, record_parity, tmp_path, f"tiny-sdxl ({hint_channels} hint channels)", hint_channels=hint_channels)
    assert [block for block, _, _ in adapter_taps(cfg)] == [2, 3, 5, MIDDLE]  # SDXL's 3, 5, 8 at one ResBlock a level
    assert [block for block, _, _ in adapter_taps(preset("sdxl").unet)] == [3, 5, 8, MIDDLE]
    assert [block for block, _, _ in adapter_taps(preset("sd15").unet)] == [2, 5, 8, 11, MIDDLE]


def test_sdxl_hints_of_odd_sixteenths_fit_the_unet():
    """A picture 8 px past a multiple of 16 (72 x 40: latents 9 x 5): the hint is padded by its last row and column,
    so the maps have the sizes of the UNet's halved levels (rounding up), which the UNet takes (it refuses maps of
    another size)."""
    import plainsd

    unet = plainsd.build("tiny-sdxl", seed=0).unet
    adapter = perturb(T2IAdapter(AdapterConfig(channels=(32, 64, 128, 128), xl=True)), 0)
    x, ctx, y = torch.randn(1, 4, 5, 9), torch.randn(1, 77, 192), torch.randn(1, unet.config.adm_in_channels)
    with torch.no_grad():
        features = adapter(torch.rand(1, 3, 40, 72))
        plain, got = unet(x, 500, ctx, y=y), unet(x, 500, ctx, adapter=features, y=y)
    assert [tuple(f.shape[-2:]) for f in features] == [(3, 5), (3, 5), (2, 3), (2, 3)]
    assert adapter.scales() == [2, 2, 4, 4] and max_diff(got, plain) > 1e-3


def test_wrong_inputs_are_refused(tiny):
    adapter = T2IAdapter(AdapterConfig(channels=(32, 64)))
    with pytest.raises(ValueError, match=r"multiples of 8"):
        adapter(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"gives 2 feature maps \(or one more for its middle block\), got 1"):
        tiny.unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 128), adapter=[torch.zeros(1, 32, 8, 8)])
    with pytest.raises(ValueError, match=r"feature map is \[32, 4, 4\].* UNet's features are \[32, 8, 8\]"):
        tiny.unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 128),
                  adapter=[torch.zeros(1, 32, 4, 4), torch.zeros(1, 64, 4, 4)])


@pytest.mark.slow
def test_full_size_adapter_matches_diffusers(tmp_path, record_parity):
    _compare(test_config("sd15").unet, record_parity, tmp_path, "sd15", tol=1e-3)
