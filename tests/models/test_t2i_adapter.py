"""The T2I-Adapter gives diffusers' T2IAdapter features on the same weights (plainsd loading the folder diffusers'
save_pretrained writes), and the UNet given them gives UNet2DConditionModel's output with
down_intrablock_additional_residuals, scaled and doubled for CFG as diffusers' adapter pipeline does."""

import pytest
import torch

from plainsd.config import AdapterConfig
from plainsd.models.t2i_adapter import T2IAdapter
from plainsd.weights import load_adapter
from tests.reference import max_diff, perturb, unet_pair
from tests.test_configs import test_config

TOL = 1e-4


def _adapters(folder, channels, seed=0, hint_channels=3):
    from diffusers import T2IAdapter as DiffusersAdapter

    torch.manual_seed(seed)
    theirs = perturb(DiffusersAdapter(in_channels=hint_channels, channels=list(channels), num_res_blocks=2,
                                      downscale_factor=8, adapter_type="full_adapter"), seed + 3)
    theirs.save_pretrained(folder)
    return theirs.eval(), load_adapter(folder)


def _compare(name, record_parity, tmp_path, hint_channels=3, tol=TOL, size=16):
    cfg = test_config(name).unet
    dunet, unet = unet_pair(cfg)
    dadapter, adapter = _adapters(tmp_path / "adapter", [cfg.model_channels * m for m in cfg.channel_mult],
                                  hint_channels=hint_channels)
    g = torch.Generator().manual_seed(0)
    hint = torch.rand(1, hint_channels, 8 * size, 8 * size, generator=g)
    x, t = torch.randn(2, cfg.in_channels, size, size, generator=g), torch.tensor([10, 900])
    ctx, scale = torch.randn(2, 77, cfg.context_dim, generator=g), 0.6
    with torch.no_grad():
        theirs = [torch.cat([f * scale] * 2) for f in dadapter(hint)]  # the pipeline: scaled, one copy per CFG half
        expected = dunet(x, t, encoder_hidden_states=ctx, return_dict=False,
                         down_intrablock_additional_residuals=[f.clone() for f in theirs])[0]
        features = adapter(hint)
        got = unet(x, t, ctx, adapter=[torch.cat([f * scale] * 2) for f in features])
        plain = unet(x, t, ctx)
    assert len(features) == len(cfg.channel_mult) and adapter.config.hint_channels == hint_channels
    d_feat = max(max_diff(torch.cat([f * scale] * 2), e) / max(1.0, float(e.abs().max())) for f, e in zip(features, theirs))
    d_out = max_diff(got, expected)
    record_parity(f"T2I-Adapter {name} features vs diffusers (relative)", d_feat)
    record_parity(f"UNet + T2I-Adapter {name} vs diffusers", d_out)
    assert d_feat <= tol and d_out <= tol, (d_feat, d_out)
    assert max_diff(got, plain) > 100 * tol  # the features change the output


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-deep"])
def test_adapter_and_adapted_unet_match_diffusers(tmp_path, record_parity, name):
    _compare(name, record_parity, tmp_path)


def test_grey_hints(tmp_path, record_parity):
    """The sketch adapters read a one-channel picture."""
    _compare("tiny", record_parity, tmp_path, hint_channels=1)


def test_wrong_inputs_are_refused(tiny):
    adapter = T2IAdapter(AdapterConfig(channels=(32, 64)))
    with pytest.raises(ValueError, match=r"multiples of 8"):
        adapter(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="gives 2 feature maps, got 1"):
        tiny.unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 128), adapter=[torch.zeros(1, 32, 8, 8)])


@pytest.mark.slow
def test_full_size_adapter_matches_diffusers(tmp_path, record_parity):
    _compare("sd15", record_parity, tmp_path, tol=1e-3)
