"""The compact upscaler against spandrel's SRVGGNetCompact (Real-ESRGAN's class as A1111 and ComfyUI load it)."""

import pytest
import spandrel
import torch
import torch.nn.functional as F

from plainsd.config import UpscalerConfig
from plainsd.models.upscaler import CompactUpscaler
from plainsd.weights import CheckpointError, load_upscaler, write_safetensors


def _random(config: UpscalerConfig, seed: int = 0) -> CompactUpscaler:
    """Random weights, PReLU slopes included (their default 0.25 everywhere would hide a swapped slope)."""
    torch.manual_seed(seed)
    net = CompactUpscaler(config)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return net.eval()


@pytest.mark.parametrize("num_feat, num_conv, scale", [(16, 3, 4), (8, 0, 2), (24, 5, 1)])
def test_same_output_as_spandrel_class(num_feat, num_conv, scale, record_parity):
    from spandrel.architectures.Compact import Compact

    ours = _random(UpscalerConfig(num_feat=num_feat, num_conv=num_conv, scale=scale))
    theirs = Compact(num_feat=num_feat, num_conv=num_conv, upscale=scale).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same keys, same shapes
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), theirs(x.clone())
    assert a.shape == (2, 3, 12 * scale, 10 * scale)
    diff = float((a - b).abs().max())
    record_parity(f"compact upscaler nf{num_feat} nc{num_conv} x{scale} vs spandrel", diff)
    assert diff < 1e-6
    # and the residual is on nearest neighbour: with the last convolution at zero, the output is the enlarged input
    with torch.no_grad():
        ours.body[-1].weight.zero_()
        ours.body[-1].bias.zero_()
        assert torch.equal(ours(x), F.interpolate(x, scale_factor=scale, mode="nearest"))


def test_saved_file_is_spandrel_compact_x4(tmp_path):
    ours = _random(UpscalerConfig(num_feat=16, num_conv=4, scale=4), seed=3)
    path = write_safetensors({k: v.half() for k, v in ours.state_dict().items()}, tmp_path / "x4.safetensors",
                             {"plainsd.steps": "0"})
    desc = spandrel.ModelLoader().load_from_file(str(path))
    assert desc.architecture.id == "Compact"
    assert desc.scale == 4 and desc.input_channels == 3 and desc.output_channels == 3
    assert desc.model.num_feat == 16 and desc.model.num_conv == 4
    loaded = load_upscaler(path)
    assert loaded.config == UpscalerConfig(num_feat=16, num_conv=4, scale=4)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = loaded(x), desc.model.float().eval()(x)
    assert float((a - b).abs().max()) < 1e-6  # the same fp16 weights, read by both


def test_not_an_upscaler_is_refused(tmp_path):
    path = write_safetensors({"conv.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a Real-ESRGAN compact upscaler"):
        load_upscaler(path)
    state = _random(UpscalerConfig(num_feat=8, num_conv=2)).state_dict()
    state["body.2.weight"] = state["body.2.weight"][:, :4]
    path = write_safetensors(state, tmp_path / "misshaped.safetensors")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_upscaler(path)
