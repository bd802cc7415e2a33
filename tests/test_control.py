"""plainsd.control: model lookup, hints, and the UNet wrapper's rules (active steps, weights, modes, several units)."""

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

import plainsd
from plainsd import control, detectors, weights
from plainsd.models.controlnet import ControlNet
from plainsd.request import ControlUnit, GenerationRequest


# --- stand-ins until the detect and net branches are in main (used only where those functions are missing) --------

def _fit(image, width, height, resize_mode="Crop and Resize"):
    return image.convert("RGB").resize((width, height), Image.NEAREST)


def _detect(module, image, resolution=512, threshold_a=None, threshold_b=None):
    return detectors.canny(image) if module == "canny" else image.convert("RGB")


def _load_controlnet(path, dtype=None):
    from safetensors.torch import load_file
    state = load_file(str(path))
    cfg = dataclasses.replace(plainsd.build("tiny", seed=0).unet.config,
                              in_channels=state["input_blocks.0.0.weight"].shape[1])
    net = ControlNet(cfg)
    net.load_state_dict(state)
    return net


@pytest.fixture(autouse=True)
def stand_ins(monkeypatch):
    if not hasattr(detectors, "MODULES"):
        monkeypatch.setattr(detectors, "MODULES", {"none": None, "canny": None}, raising=False)
        monkeypatch.setattr(detectors, "detect", _detect, raising=False)
        monkeypatch.setattr(detectors, "fit", _fit, raising=False)
        monkeypatch.setattr(detectors, "pixel_perfect_resolution", lambda image, w, h, mode: min(w, h), raising=False)
    if not hasattr(weights, "load_controlnet"):
        monkeypatch.setattr(weights, "load_controlnet", _load_controlnet, raising=False)


def random_controlnet(unet_cfg, seed: int = 0, in_channels: int | None = None) -> ControlNet:
    """A ControlNet whose zero convolutions are not zero, so that it changes the picture."""
    torch.manual_seed(seed)
    cfg = unet_cfg if in_channels is None else dataclasses.replace(unet_cfg, in_channels=in_channels)
    net = ControlNet(cfg)
    with torch.no_grad():
        for module in [*net.zero_convs, net.middle_block_out, net.input_hint_block[-1:]]:
            for p in module.parameters():
                p.normal_(0, 0.3)
    return net.eval()


def save_controlnet(net: ControlNet, path) -> None:
    if hasattr(weights, "save_controlnet"):
        weights.save_controlnet(net, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def sd():
    return plainsd.build("tiny", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sd):
    """A ControlNet folder: two random ControlNets for the tiny model, one in a subfolder, and a non-model file."""
    root = tmp_path_factory.mktemp("ControlNet")
    save_controlnet(random_controlnet(sd.unet.config, 0), root / "cn_a.safetensors")
    (root / "more").mkdir()
    save_controlnet(random_controlnet(sd.unet.config, 1), root / "more" / "cn_b.safetensors")
    (root / "notes.txt").write_text("not a model")
    return root


# --- 1. models -----------------------------------------------------------------------------------------------------

def test_list_and_find_by_name_hash_or_path(folder):
    found = control.list_controlnets(folder)
    assert {"cn_a", "cn_b"} <= set(found) and "notes" not in found
    assert found["cn_b"] == folder / "more" / "cn_b.safetensors"
    data = (folder / "cn_a.safetensors").read_bytes()
    short = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]  # A1111's model_hash
    titles = control.controlnet_titles(folder)
    assert titles[f"cn_a [{short}]"] == folder / "cn_a.safetensors"
    for name in ("cn_a", f"cn_a [{short}]", "CN_A", str(folder / "cn_a.safetensors")):
        assert control.find_controlnet(name, folder) == folder / "cn_a.safetensors"
    with pytest.raises(ValueError, match="no ControlNet named 'cn_c'.*available: .*cn_a, cn_b"):
        control.find_controlnet("cn_c", folder)
    with pytest.raises(ValueError, match="ControlNet folder .* does not exist"):
        control.list_controlnets(folder / "missing")


def test_diffusers_folders_are_listed_by_name(tmp_path):
    net = tmp_path / "control_sd15_canny"
    net.mkdir()
    (net / "config.json").write_text("{}")
    (net / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 10)
    assert control.list_controlnets(tmp_path)["control_sd15_canny"] == net


def test_a_controlnet_is_loaded_once_per_engine(sd, folder, monkeypatch):
    from plainsd.runtime import Engine
    engine = Engine(sd)
    loads = []
    real = weights.load_controlnet
    monkeypatch.setattr(weights, "load_controlnet", lambda path, dtype=None: loads.append(path) or real(path))
    units = (ControlUnit("cn_a"), ControlUnit("cn_b"), ControlUnit("cn_a"))
    first = control.load_controlnets(engine, units, folder)
    again = control.load_controlnets(engine, units, folder)
    assert len(loads) == 2 and first[0] is first[2] is again[0] and first[1] is again[1]


def test_a_controlnet_for_another_model_is_refused(sd):
    other = ControlNet(dataclasses.replace(sd.unet.config, context_dim=64))  # (as SD 2.x's 1024 beside SD 1.x's 768)
    with pytest.raises(ValueError, match="the ControlNet 'cn_x' is for another kind of model .*context_dim 64"):
        control._check_fits(other, sd.unet.config, "cn_x")
    control._check_fits(ControlNet(sd.unet.config), sd.unet.config, "cn_x")


# --- 3. the wrapper ------------------------------------------------------------------------------------------------

class SpyUNet:
    """Records what each call got as control; returns zeros."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, control=None):
        self.calls.append((float(torch.as_tensor(t).reshape(-1)[0]), control))
        return torch.zeros_like(x[:, :4])


def _inputs(sd, rows):
    torch.manual_seed(0)
    x = torch.randn(rows, 4, 8, 8)
    context = torch.randn(rows, 77, sd.unet.config.context_dim)
    hint = torch.rand(1, 3, 64, 64)
    return x, context, hint


def _unit(net, hint, weight=1.0, start=0.0, end=1.0, soft=False, cond_only=False):
    return control.ActiveUnit(net, hint, weight, start, end, soft, cond_only)


def test_modes_weights_and_halves(sd):
    """Balanced: weight x residuals on every row; soft: weight x 0.825 ** (n - 1 - i); cfg injection: none on the
    unconditional rows (the first `batch` of a guided call)."""
    net = random_controlnet(sd.unet.config)
    x, context, hint = _inputs(sd, 4)  # batch 2, guided: rows 0-1 unconditional
    t = torch.tensor(500.0)
    with torch.no_grad():
        plain = net(x, hint, t.expand(4), context)
    n = len(plain)
    for soft, cond_only in ((False, False), (True, False), (True, True)):
        spy = SpyUNet()
        wrapped = control.ControlledUNet(spy, [_unit(net, hint, 0.7, soft=soft, cond_only=cond_only)],
                                         torch.tensor([900.0, 500.0, 100.0]), batch=2, parts=1)
        wrapped(x, t, context)
        got = spy.calls[0][1]
        assert len(got) == n
        for i, (g, p) in enumerate(zip(got, plain)):
            scale = 0.7 * 0.825 ** (n - 1 - i) if soft else 0.7
            expected = p * scale
            if cond_only:
                expected[:2] = 0
            torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
    # an unguided call (cfg scale 1, or past guidance_until) has no unconditional rows: all rows get residuals
    spy = SpyUNet()
    control.ControlledUNet(spy, [_unit(net, hint, 1.0, soft=True, cond_only=True)], torch.tensor([900.0]),
                           batch=4, parts=1)(x, t, context)
    assert all(bool((r[:2] != 0).any()) for r in spy.calls[0][1])


def test_two_units_add_up(sd):
    a, b = random_controlnet(sd.unet.config, 0), random_controlnet(sd.unet.config, 1)
    x, context, hint = _inputs(sd, 2)
    t = torch.tensor(300.0)
    outs = []
    for units in ([_unit(a, hint, 0.5)], [_unit(b, hint, 1.5, soft=True)],
                  [_unit(a, hint, 0.5), _unit(b, hint, 1.5, soft=True)]):
        spy = SpyUNet()
        control.ControlledUNet(spy, units, torch.tensor([900.0, 300.0]), batch=1, parts=1)(x, t, context)
        outs.append(spy.calls[0][1])
    for ra, rb, both in zip(*outs):
        torch.testing.assert_close(both, ra + rb, rtol=1e-5, atol=1e-6)


def test_active_steps_follow_the_extension(sd):
    """10 steps, start 0.3, end 0.6: a call in step i sees A1111's sampling step max(i - 1, 0); the unit is on for
    0.3 <= that / 10 <= 0.6, i.e. steps 4 to 7."""
    net = random_controlnet(sd.unet.config)
    x, context, hint = _inputs(sd, 1)
    ts = torch.linspace(999, 99, 10)
    spy = SpyUNet()
    wrapped = control.ControlledUNet(spy, [_unit(net, hint, start=0.3, end=0.6)], ts, batch=1, parts=1)
    for t in ts:
        wrapped(x, t, context)
    on = [i for i, (_, c) in enumerate(spy.calls) if c is not None]
    assert on == [4, 5, 6, 7]
    # a call between two steps' noise levels (DPM2's midpoint) belongs to the step it started from
    assert wrapped.step(torch.tensor(float(ts[3] + ts[4]) / 2)) == 3
    # start 0: the first step is on (it sees step 0); end 0.1 keeps steps 0 to 2 (seen 0, 0, 0.1)
    spy = SpyUNet()
    wrapped = control.ControlledUNet(spy, [_unit(net, hint, end=0.1)], ts, batch=1, parts=1)
    for t in ts:
        wrapped(x, t, context)
    assert [i for i, (_, c) in enumerate(spy.calls) if c is not None] == [0, 1, 2]


def test_active_units_modes_and_hires_soft_injection(sd):
    net = random_controlnet(sd.unet.config)
    hint = torch.zeros(1, 3, 64, 64)
    units = (ControlUnit("m", module="canny"), ControlUnit("m", control_mode=1), ControlUnit("m", control_mode=2),
             ControlUnit("m", weight=0))
    first = control.active_units(units, [net] * 4, [hint] * 4)
    assert [(u.soft, u.cond_only) for u in first] == [(False, False), (True, False), (True, True)]  # weight 0: out
    hires = control.active_units(units, [net] * 4, [hint] * 4, hires=True)
    assert hires[0].soft and not hires[0].cond_only  # canny on the hires pass: soft weights, as the extension


def test_inpainting_unet_gives_the_controlnet_its_first_four_channels(sd):
    net = random_controlnet(sd.unet.config)
    x, context, hint = _inputs(sd, 1)
    x9 = torch.cat([x, torch.randn(1, 5, 8, 8)], dim=1)
    spy = SpyUNet()
    control.ControlledUNet(spy, [_unit(net, hint)], torch.tensor([500.0]), 1, 1)(x9, torch.tensor(500.0), context)
    with torch.no_grad():
        expected = net(x, hint, torch.tensor([500.0]), context)
    for g, e in zip(spy.calls[0][1], expected):
        torch.testing.assert_close(g, e)


def test_deepcache_calls_get_the_outer_residuals(sd):
    """A cheap DeepCache call runs the ControlNet's first blocks only: the same residuals as the whole run's."""
    net = random_controlnet(sd.unet.config)
    x, context, hint = _inputs(sd, 1)
    t = torch.tensor([400.0])
    with torch.no_grad():
        whole = net(x, hint, t, context)
        part = control.run_controlnet(net, x, hint, t, context, stop=2)
    assert len(part) == 2
    for p, w in zip(part, whole):
        torch.testing.assert_close(p, w)


# --- 2. hints ------------------------------------------------------------------------------------------------------

def test_hint_tensor_is_rgb_in_0_1_at_the_size():
    picture = Image.new("RGB", (40, 20), (255, 0, 51))
    hint = control.hint_tensor(picture, 32, 16, "Just Resize")
    assert hint.shape == (1, 3, 16, 32)
    torch.testing.assert_close(hint[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_img2img_without_an_image_uses_the_init_image_and_its_resize_mode():
    init = Image.new("RGB", (64, 64), (10, 20, 30))
    req = GenerationRequest("x", init_image=init, width=64, height=64, resize_mode=2)
    source, resize = control._source(ControlUnit("m"), req, None)
    assert np.array_equal(np.asarray(source), np.asarray(init)) and resize == "Resize and Fill"
    req = GenerationRequest("x", init_image=init, width=64, height=64, resize_mode=3)
    assert control._source(ControlUnit("m", resize_mode=1), req, None)[1] == "Just Resize"
    own = Image.new("RGB", (64, 64), (200, 0, 0))
    assert control._source(ControlUnit("m", own, resize_mode=2), req, None) [1] == "Resize and Fill"


def test_infotext_entries(folder):
    units = (ControlUnit("cn_a", module="canny", weight=0.5, guidance_end=0.8, control_mode=2),
             ControlUnit("cn_b", threshold_a=3, processor_res=256, pixel_perfect=True, resize_mode="Just Resize"))
    fields = control.infotext_fields(units, folder)
    short = control.model_hash(folder / "cn_a.safetensors")
    a = fields["ControlNet 0"]
    assert a.startswith(f"Module: canny, Model: cn_a [{short}], Weight: 0.5, Resize Mode: Crop and Resize, "
                        f"Processor Res: 512, Threshold A: ")
    assert a.endswith("Guidance Start: 0.0, Guidance End: 0.8, Pixel Perfect: False, "
                      "Control Mode: ControlNet is more important")
    b = fields["ControlNet 1"]
    assert "Resize Mode: Just Resize, Processor Res: 256, Threshold A: 3.0, Threshold B: -1.0" in b
    assert "Pixel Perfect: True, Control Mode: Balanced" in b


def test_deepcache_adds_all_residuals_on_whole_calls_and_the_outer_ones_on_cheap_calls(sd):
    from plainsd.fast import DeepCacheUNet
    net = random_controlnet(sd.unet.config)
    x, context, hint = _inputs(sd, 1)
    t = torch.tensor([400.0])
    asked = []

    def residuals(stop=None):
        asked.append(stop)
        return control.run_controlnet(net, x, hint, t, context, stop)

    cache = DeepCacheUNet(sd.unet, interval=2, depth=1)
    with torch.no_grad():
        whole = cache(x, t, context, control=residuals)
        cheap = cache(x, t, context, control=residuals)
        expected = sd.unet(x, t, context, control=net(x, hint, t, context))
        uncontrolled_cheap = DeepCacheUNet(sd.unet, interval=2, depth=1)
        uncontrolled_cheap(x, t, context, control=residuals)
        without = uncontrolled_cheap(x, t, context)
    assert asked == [None, 1, None]
    torch.testing.assert_close(whole, expected)
    assert not torch.allclose(cheap, without)  # the cheap call's outer skip got its residual
