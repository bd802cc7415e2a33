"""The OpenVINO-compiled UNet: within float32 (and bf16) tolerance of eager, cached on disk, following weight
changes; the cache keeps its most recently used models."""

import shutil

import numpy as np
import pytest
import torch

import plainsd
from tests.reference import perturb
from plainsd import runtime
from plainsd.pipeline import txt2img
from plainsd.runtime import openvino


def _model(seed=0):
    return perturb(plainsd.build("tiny", seed=seed), seed)  # no zero-initialised layer hides a difference


def _pixels(result):
    return np.asarray(result.images[0], dtype=np.float64)



def test_openvino_backend_matches_eager_and_caches(tmp_path, monkeypatch):
    import openvino as ov  # a test extra: a missing one fails here rather than skipping
    sd = _model(1)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([900.0, 900.0]), torch.randn(2, 77, 128)
    with torch.no_grad():
        reference = sd.unet(x, t, c)
    engine = runtime.prepare(sd, backend="openvino", cache_dir=tmp_path)
    out = engine.unet(x, t, c)
    assert (out - reference).abs().max() < 1e-4 * reference.abs().max()
    assert len(list(tmp_path.glob("*/unet.xml"))) == 1

    assert len(list(tmp_path.glob("*/*.blob"))) == 1  # the compiled model of this input shape, exported

    # a second process (here: a second backend) imports that compiled model: nothing converted or compiled
    monkeypatch.setattr(ov, "convert_model", lambda *a, **k: pytest.fail("converted again despite the cache"))
    monkeypatch.setattr(ov.Core, "compile_model", lambda *a, **k: pytest.fail("compiled again despite the cache"))
    again = runtime.OpenVINOUNet(sd.unet, tmp_path)
    assert torch.equal(again(x, t, c), out)
    monkeypatch.undo()

    # a conversion made by other code (the networks' source changed since) is not reused
    other = tmp_path / "other"
    runtime.OpenVINOUNet(sd.unet, other)(x, t, c)
    monkeypatch.setattr(openvino, "code_version", lambda: "other code")
    assert torch.equal(runtime.OpenVINOUNet(sd.unet, other)(x, t, c), out)
    assert len(list(other.glob("*/unet.xml"))) == 2
    monkeypatch.undo()
    shutil.rmtree(other)

    # a blob this OpenVINO cannot read (another version's, a damaged one) is compiled afresh and replaced
    blob = next(tmp_path.glob("*/*.blob"))
    blob.write_bytes(b"not a compiled model")
    assert torch.equal(runtime.OpenVINOUNet(sd.unet, tmp_path)(x, t, c), out)
    assert blob.stat().st_size > 1000 and not list(tmp_path.glob("*/*.tmp"))

    # a disk that cannot take the compiled model costs a warning, not the result (and leaves no partial file)
    blob.unlink()
    def refuse(*a):
        raise OSError("No space left on device")
    monkeypatch.setattr(openvino.os, "replace", refuse)
    with pytest.warns(UserWarning, match="could not keep the compiled model"):
        assert torch.equal(runtime.OpenVINOUNet(sd.unet, tmp_path)(x, t, c), out)
    assert not list(tmp_path.glob("*/*.blob")) and not list(tmp_path.glob("*/*.tmp"))
    monkeypatch.undo()

    # weights changed in place (as a LoRA does for one run): the compiled model follows
    with torch.no_grad():
        sd.unet.out[2].weight.mul_(2)
        changed = sd.unet(x, t, c)
    assert (engine.unet(x, t, c) - changed).abs().max() < 1e-4 * changed.abs().max()

    # bf16: within bf16 tolerance of the float32 reference
    engine = runtime.prepare(sd, backend="openvino", cache_dir=tmp_path, precision="bf16")
    with torch.no_grad():
        sd.unet.out[2].weight.div_(2)
    bf = engine.unet(x, t, c)
    assert (bf - reference).abs().max() < 0.08 * reference.abs().max()


def test_openvino_backend_in_generation(tmp_path):
    sd = _model(2)
    eager = txt2img(sd, "a blue square", steps=5, seed=1, cfg_scale=4)
    engine = runtime.prepare(sd, backend="openvino", cache_dir=tmp_path)
    compiled = txt2img(engine, "a blue square", steps=5, seed=1, cfg_scale=4)
    assert np.abs(_pixels(eager) - _pixels(compiled)).max() <= 2


def test_openvino_runs_an_lcm_unet_with_its_guidance(tmp_path):
    """An LCM-distilled UNet is converted with its guidance scale as a fourth input; a call must give one."""
    from tests.test_configs import test_config

    sd = perturb(plainsd.build(test_config("tiny-lcm"), seed=3), 3)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([900.0, 900.0]), torch.randn(2, 77, 128)
    with torch.no_grad():
        exact, other = sd.unet(x, t, c, guidance=7.0), sd.unet(x, t, c, guidance=1.0)
    engine = runtime.prepare(sd, backend="openvino", cache_dir=tmp_path)
    assert (engine.unet(x, t, c, guidance=7.0) - exact).abs().max() < 1e-4 * exact.abs().max()
    assert (engine.unet(x, t, c, guidance=torch.tensor([1.0, 1.0])) - other).abs().max() < 1e-4 * other.abs().max()
    with pytest.raises(ValueError, match="LCM-distilled"):
        engine.unet(x, t, c)
    with pytest.raises(ValueError, match="no guidance-scale embedding"):
        runtime.prepare(_model(), backend="openvino", cache_dir=tmp_path).unet(x, t, c, guidance=7.0)


def test_the_openvino_cache_drops_its_least_recently_used_models_beyond_its_limit(tmp_path, monkeypatch):
    import os

    for age, name in enumerate(["newest", "middle", "oldest", "inuse"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "unet.xml").write_bytes(b"x" * 1000)
        os.utime(tmp_path / name, (1e9 - age * 100, 1e9 - age * 100))
    (tmp_path / "half.123.tmp").mkdir()  # another process's conversion in progress: not the cache's to judge
    (tmp_path / "half.123.tmp" / "unet.xml").write_bytes(b"x" * 5000)
    # 4000 bytes of models; a 2500-byte limit drops the two least recently used, except the one in use
    assert runtime.prune_cache(tmp_path, 2500, keep="inuse") == ["oldest", "middle"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.123.tmp", "inuse", "newest"]
    assert runtime.prune_cache(tmp_path, 2500, keep="inuse") == []  # within the limit now
    monkeypatch.setenv("PLAINSD_OPENVINO_CACHE_GB", "0.5")
    assert runtime.cache_limit() == 2**29
    monkeypatch.setenv("PLAINSD_OPENVINO_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="must be a number of gigabytes, not 'lots'"):
        runtime.cache_limit()
