"""Upscaler files through plainsd.upscale against spandrel's own loading and running of the same files.

The models are random-weight networks built with spandrel's architecture classes (no downloads), written as the
files people have: ESRGAN in its old and new key layouts, Real-ESRGAN's compact network, SwinIR.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from plainsd import upscale
from plainsd.weights import CheckpointError, write_safetensors

spandrel = pytest.importorskip("spandrel")
from spandrel.architectures.Compact import Compact  # noqa: E402
from spandrel.architectures.ESRGAN import ESRGAN  # noqa: E402
from spandrel.architectures.SwinIR import SwinIR  # noqa: E402


def _esrgan_old(seed=0, scale=4):
    torch.manual_seed(seed)
    state = ESRGAN(num_filters=8, num_blocks=1, scale=scale).state_dict()
    last = max(int(k.split(".")[1]) for k in state)
    state[f"model.{last}.bias"] += 0.5  # random weights put most outputs below 0; centre them in [0, 1]
    return state


def _esrgan_new(seed=1):
    """Real-ESRGAN's RRDBNet key names (conv_first, body.N.rdbM.convK, conv_body, conv_up1/2, conv_hr, conv_last),
    inside a params_ema dict as its training saves them."""
    old = _esrgan_old(seed)
    names = {"model.0": "conv_first", "model.1.sub.1": "conv_body", "model.3": "conv_up1", "model.6": "conv_up2",
             "model.8": "conv_hr", "model.10": "conv_last"}
    new = {}
    for key, value in old.items():
        layer, kind = key.rsplit(".", 1)
        if layer.startswith("model.1.sub.0.RDB"):  # model.1.sub.0.RDB1.conv1.0 -> body.0.rdb1.conv1
            block, conv = layer.split(".")[4], layer.split(".")[5]
            new[f"body.0.rdb{block[3:]}.{conv}.{kind}"] = value
        else:
            new[f"{names[layer]}.{kind}"] = value
    return {"params_ema": new}


def _compact(seed=2, scale=4):
    torch.manual_seed(seed)
    return Compact(num_feat=8, num_conv=2, upscale=scale).state_dict()


def _swinir(seed=3):
    torch.manual_seed(seed)
    return SwinIR(upscale=2, img_size=16, window_size=4, embed_dim=12, depths=[1], num_heads=[2], mlp_ratio=2.0,
                  upsampler="pixelshuffle", resi_connection="1conv").state_dict()


def _write(state, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        write_safetensors({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


def _picture(w=40, h=28, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


MODELS = {  # folder/file -> (state, scale)
    "ESRGAN/4x-old.pth": (_esrgan_old, 4),
    "ESRGAN/4x-new.pth": (_esrgan_new, 4),
    "RealESRGAN/realesr-general-x4v3.safetensors": (_compact, 4),
    "SwinIR/SwinIR-2x.pth": (_swinir, 2),
}


@pytest.fixture
def models(tmp_path):
    for name, (make, _) in MODELS.items():
        _write(make(), tmp_path / name)
    return tmp_path


def test_a1111_layout_lists_names_as_a1111(models):
    names = upscale.upscaler_names(models)
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    # file stems, Real-ESRGAN's own file under A1111's name, sorted without case
    assert [n for n in names[3:] if n != "plainsd-x4"] == ["4x-new", "4x-old", "R-ESRGAN General 4xV3", "SwinIR-2x"]
    rows = {r["name"]: r for r in upscale.describe(models)}
    assert rows["SwinIR-2x"]["scale"] == 2 and rows["4x-old"]["scale"] == 4
    assert rows["R-ESRGAN General 4xV3"]["model_path"].endswith("realesr-general-x4v3.safetensors")


@pytest.mark.parametrize("name", list(MODELS))
def test_each_file_runs_as_spandrel_runs_it(models, name, record_parity):
    path = models / name
    listed = next(f for f in upscale.list_upscalers(models).values() if f.path == path)
    ours = upscale.load_upscaler(path)
    reference = spandrel.ModelLoader().load_from_file(path)  # spandrel reading the file itself
    assert ours.scale == reference.scale == MODELS[name][1]
    x = upscale._to_tensor(_picture())
    with torch.no_grad():
        expected = reference.model.float().eval()(x[None]).clamp(0, 1)[0]
    got = upscale.run_model(ours, x, tile=0, precision="fp32")
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    record_parity(f"upscaler {name} vs spandrel", diff)
    assert diff < 1e-6
    assert expected.std() > 0.01  # the model does something (not one colour), so equality means something
    # the whole way from a picture, by name, at the model's own scale: the reference's output rounded, where a value
    # within 1e-6 of a half step may round the other way (it does on AVX2 kernels): one step at most, and rarely
    picture = upscale.upscale(_picture(), listed.name, MODELS[name][1], models, tile=0, precision="fp32")
    steps = np.abs(np.asarray(picture, dtype=int) - np.asarray(upscale._to_pil(expected), dtype=int))
    assert steps.max() <= 1 and (steps > 0).mean() < 1e-3


def test_tiles_placed_as_a1111_split_grid():
    assert upscale.positions(1024, 512, 64) == [0, 256, 512]
    assert upscale.positions(100, 32, 8) == [0, 22, 45, 68]   # ceil(92 / 24) = 4 tiles, 68 / 3 apart
    assert upscale.positions(30, 32, 8) == [0]


def test_tiled_blend_is_exact_for_a_pointwise_model():
    """The tiles' geometry and blend alone: a model whose output pixel depends on its input pixel only gives the
    same picture tiled as whole (the overlaps blend equal values)."""
    x = torch.rand(3, 53, 71)

    def nearest2(t):
        return t.repeat_interleave(2, 1).repeat_interleave(2, 2) * 0.5 + 0.25

    whole = nearest2(x)
    for tile, overlap in ((16, 4), (24, 8), (70, 0)):
        assert torch.allclose(upscale.tiled(nearest2, x, tile, tile, overlap, scale=2), whole, atol=1e-6)


# The largest difference tiled (32 px tiles, 8 px overlap) vs whole, in [0, 1] units, a little above what these
# random models measured (fp32): ESRGAN 1.2e-3, compact 5.2e-3, SwinIR 3.2e-2 (its attention windows fall
# differently in a tile); means 2.5e-5, 1.5e-4, 1.1e-3. A tile's edge sees padding where the whole picture has
# pixels; the overlap's blend hides most of it.
TILED_TOLERANCE = {"ESRGAN/4x-old.pth": 0.003, "RealESRGAN/realesr-general-x4v3.safetensors": 0.01,
                   "SwinIR/SwinIR-2x.pth": 0.05}


@pytest.mark.parametrize("name", list(TILED_TOLERANCE))
def test_tiled_equals_whole_within_tolerance(models, name, record_parity):
    model = upscale.load_upscaler(models / name)
    x = upscale._to_tensor(_picture(72, 56, seed=5))
    whole = upscale.run_model(model, x, tile=0, precision="fp32")
    tiles = upscale.run_model(model, x, tile=32, tile_overlap=8, precision="fp32")
    worst, mean = (tiles - whole).abs().max().item(), (tiles - whole).abs().mean().item()
    record_parity(f"upscaler {name} tiled 32/8 vs whole (max)", worst)
    record_parity(f"upscaler {name} tiled 32/8 vs whole (mean)", mean)
    assert worst < TILED_TOLERANCE[name] and mean < TILED_TOLERANCE[name] / 10


def test_bf16_autocast_close_to_fp32(models):
    model = upscale.load_upscaler(models / "ESRGAN/4x-old.pth")
    x = upscale._to_tensor(_picture())
    fp32 = upscale.run_model(model, x, tile=0, precision="fp32")
    bf16 = upscale.run_model(model, x, tile=0, precision="bf16")
    assert 0 < (bf16 - fp32).abs().max().item() < 0.03  # (it did run in bf16: not equal)


def test_scale_asked_vs_model_scale(models):
    """A1111's Upscaler.upscale: the model again until large enough, then Lanczos to the size asked (multiples of 8)."""
    picture = _picture(24, 16)
    model = upscale.load_upscaler(models / "SwinIR/SwinIR-2x.pth")

    def once(p):
        return upscale._to_pil(upscale.run_model(model, upscale._to_tensor(p), tile=0, precision="fp32"))

    kw = dict(tile=0, precision="fp32")
    four = upscale.upscale(picture, "SwinIR-2x", 4, models, **kw)  # two passes
    assert np.array_equal(np.asarray(four), np.asarray(once(once(picture))))
    three = upscale.upscale(picture, "SwinIR-2x", 3, models, **kw)   # two passes, then down to 72x48
    assert np.array_equal(np.asarray(three), np.asarray(once(once(picture)).resize((72, 48), Image.LANCZOS)))
    odd = upscale.upscale(picture, "SwinIR-2x", 1.5, models, **kw)   # one pass, then down to 32x24 (multiples of 8)
    assert np.array_equal(np.asarray(odd), np.asarray(once(picture).resize((32, 24), Image.LANCZOS)))
    lanczos = upscale.upscale(picture, "Lanczos", 2.5, models)        # 60x40, then 56x40
    assert lanczos.size == (56, 40)
    assert np.array_equal(np.asarray(lanczos),
                          np.asarray(picture.resize((60, 40), Image.LANCZOS).resize((56, 40), Image.LANCZOS)))


def test_shipped_upscaler_listed_without_a_folder(tmp_path, monkeypatch):
    shipped = _write(_compact(seed=7), tmp_path / "data" / "plainsd-x4.safetensors")
    monkeypatch.setattr(upscale, "SHIPPED", shipped)
    assert upscale.upscaler_names() == ["None", "Lanczos", "Nearest", "plainsd-x4"]
    assert upscale.describe()[-1] == {"name": "plainsd-x4", "model_name": "plainsd", "model_path": str(shipped),
                                      "model_url": None, "scale": 4}
    reference = spandrel.ModelLoader().load_from_file(shipped)
    x = upscale._to_tensor(_picture(16, 16))
    with torch.no_grad():
        expected = upscale._to_pil(reference.model.eval()(x[None]).clamp(0, 1)[0])
    got = upscale.upscale(_picture(16, 16), "plainsd-x4", 4, tile=0, precision="fp32")
    assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_plain_folder_of_files(tmp_path):
    _write(_compact(), tmp_path / "mine" / "sharp-x4.pth")
    assert "sharp-x4" in upscale.upscaler_names(tmp_path / "mine")


def test_unknown_name_lists_the_names(models):
    with pytest.raises(ValueError, match=r"no upscaler named 'UltraSharp'.*available: None, Lanczos, Nearest, plainsd-x4, 4x-new"):
        upscale.find_upscaler("UltraSharp", models)
    assert upscale.find_upscaler("4X-OLD", models).name == "4x-old"  # any case


def test_pickled_code_refused(tmp_path):
    path = tmp_path / "ESRGAN" / "evil.pth"
    path.parent.mkdir()
    torch.save(Compact(num_feat=4, num_conv=1), path)  # a whole pickled module, not a dict of tensors
    with pytest.raises(CheckpointError, match=r"^evil.pth holds pickled Python objects .* weights_only=True"):
        upscale.upscale(_picture(), "evil", 2, tmp_path)


def test_not_an_upscaler(tmp_path):
    path = _write({"first.weight": torch.zeros(4, 4)}, tmp_path / "ESRGAN" / "notes.safetensors")
    with pytest.raises(CheckpointError, match=r"^notes.safetensors is not an upscaler spandrel knows"):
        upscale.load_upscaler(path)
    assert {r["name"]: r["scale"] for r in upscale.describe(tmp_path)}["notes"] is None
    (tmp_path / "ESRGAN" / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"^cut.pth is not a readable upscaler file"):
        upscale.load_upscaler(tmp_path / "ESRGAN" / "cut.pth")


def test_tiling_settings_checked():
    with pytest.raises(ValueError, match="tile size"):
        upscale.check_tiling(8, 0)
    with pytest.raises(ValueError, match="tile overlap"):
        upscale.check_tiling(32, 32)
    upscale.check_tiling(0, 8)


def test_extras_scale_by_and_blend(models):
    picture = _picture(50, 30)
    settings = upscale.Extras(upscaler_1="Lanczos", upscaler_2="Nearest", upscaler_2_visibility=0.25,
                              upscaling_resize=2)
    out, info = upscale.extras(picture, settings, models)
    first = picture.resize((100, 60), Image.LANCZOS).resize((96, 56), Image.LANCZOS)
    second = picture.resize((100, 60), Image.NEAREST).resize((96, 56), Image.LANCZOS)
    assert np.array_equal(np.asarray(out), np.asarray(Image.blend(first, second, 0.25)))
    assert upscale.postprocessing_text(info) == ("Postprocess upscale by: 2, Postprocess upscaler: Lanczos, "
                                                 "Postprocess upscaler 2: Nearest")


def test_extras_scale_to_with_crop(models):
    picture = _picture(50, 30)
    settings = upscale.Extras(upscaler_1="4x-old", resize_mode=1, upscaling_resize_w=120, upscaling_resize_h=60)
    out, info = upscale.extras(picture, settings, models, tile=0, precision="fp32")
    # by max(120/50, 60/30) = 2.4: the model once (200x120), Lanczos to 120x72, centred on 120x60
    once = upscale.upscale(picture, "4x-old", 2.4, models, tile=0, precision="fp32")
    assert once.size == (120, 72) and out.size == (120, 60)
    assert np.array_equal(np.asarray(out), np.asarray(once)[6:66])
    assert upscale.postprocessing_text(info) == ("Postprocess upscale to: 120x60, Postprocess crop to: 120x60, "
                                                 "Postprocess upscaler: 4x-old")
    assert settings.output_size(50, 30) == (120, 60)


def test_extras_none_leaves_the_picture(models):
    picture = _picture()
    out, info = upscale.extras(picture, upscale.Extras(), models)
    assert np.array_equal(np.asarray(out), np.asarray(picture)) and info == {}
    with pytest.raises(ValueError, match="nothing to blend"):
        upscale.extras(picture, upscale.Extras(upscaler_2="Lanczos", upscaler_2_visibility=0.5), models)
    with pytest.raises(ValueError, match="upscaling_resize"):
        upscale.extras(picture, upscale.Extras(upscaler_1="Lanczos", upscaling_resize=9), models)
