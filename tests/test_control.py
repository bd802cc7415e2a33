"""plainsd.control: model lookup, hints, and the UNet wrapper's rules (active steps, weights, modes, several units)."""

import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

import plainsd
from plainsd import control, weights
from plainsd.models.controlnet import ControlNet
from plainsd.request import ControlUnit, GenerationRequest
from plainsd.weights import save_controlnet


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
    real = weights.load_control_model
    monkeypatch.setattr(weights, "load_control_model", lambda path, dtype=None, unet=None: loads.append(path) or real(path))
    units = (ControlUnit("cn_a"), ControlUnit("cn_b"), ControlUnit("cn_a"))
    first = control.load_controlnets(engine, units, folder)
    again = control.load_controlnets(engine, units, folder)
    assert len(loads) == 2 and first[0] is first[2] is again[0] and first[1] is again[1]


def test_the_oldest_controlnet_is_dropped_before_another_is_read(sd, folder, tmp_path, monkeypatch):
    """The cache keeps CACHE_SIZE networks; the least recently used one the request does not name goes before the
    next is read, so that no more than CACHE_SIZE (or what one request uses) are in memory while it loads, and
    one the request names is never dropped to be read again."""
    from plainsd.runtime import Engine
    for name, source in (("cn_a", "cn_a"), ("cn_b", "more/cn_b"), ("cn_c", "cn_a")):
        (tmp_path / f"{name}.safetensors").write_bytes((folder / f"{source}.safetensors").read_bytes())
    folder, engine, held = tmp_path, Engine(sd), []
    real = weights.load_control_model
    monkeypatch.setattr(weights, "load_control_model",
                        lambda path, dtype=None, unet=None: held.append(len(engine.controlnets)) or real(path))
    for name in ("cn_a", "cn_b", "cn_c", "cn_a"):
        control.load_controlnets(engine, (ControlUnit(name),), folder)
    assert held == [0, 1, 1, 1] and len(engine.controlnets) == control.CACHE_SIZE == 2
    held.clear()
    nets = control.load_controlnets(engine, (ControlUnit("cn_b"), ControlUnit("cn_a"), ControlUnit("cn_c")), folder)
    assert held == [2] and len(engine.controlnets) == 3  # (cn_c and cn_a, named, stay: only cn_b is read)
    assert all(n in engine.controlnets.values() for n in nets)


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
        part = net(x, hint, t, context, stop=2)
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
                        f"Processor Res: 512, Threshold A: 100, Threshold B: 200, ")
    assert a.endswith("Guidance Start: 0.0, Guidance End: 0.8, Pixel Perfect: False, "
                      "Control Mode: ControlNet is more important")
    b = fields["ControlNet 1"]
    assert "Resize Mode: Just Resize, Processor Res: 256, Threshold A: 0.5, Threshold B: 0.5" in b
    assert "Pixel Perfect: True, Control Mode: Balanced" in b


def test_deepcache_adds_all_residuals_on_whole_calls_and_the_outer_ones_on_cheap_calls(sd):
    from plainsd.fast import DeepCacheUNet
    net = random_controlnet(sd.unet.config)
    x, context, hint = _inputs(sd, 1)
    t = torch.tensor([400.0])
    asked = []

    def residuals(stop=None):
        asked.append(stop)
        return net(x, hint, t, context, stop=stop)

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


# --- T2I-Adapters in units -----------------------------------------------------------------------------------------

def random_adapter(unet_cfg, seed: int = 0, hint_channels: int = 3):
    """A T2I-Adapter for this UNet (one feature map per level, the level's channels), random weights."""
    from plainsd.config import AdapterConfig
    from plainsd.models.t2i_adapter import T2IAdapter
    torch.manual_seed(seed)
    channels = tuple(unet_cfg.model_channels * m for m in unet_cfg.channel_mult)
    return T2IAdapter(AdapterConfig(channels=channels, num_res_blocks=1, hint_channels=hint_channels)).eval()


class AdapterSpy:
    """Records each call's control and adapter; returns zeros."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, control=None, adapter=None):
        self.calls.append((control, adapter))
        return torch.zeros_like(x[:, :4])


def test_load_control_model_tells_the_kinds_apart(sd, folder, tmp_path):
    from plainsd.models.t2i_adapter import T2IAdapter
    adapter = random_adapter(sd.unet.config)
    weights.save_adapter(adapter, tmp_path / "t2iadapter_x.safetensors")
    loaded = weights.load_control_model(tmp_path / "t2iadapter_x.safetensors")
    assert isinstance(loaded, T2IAdapter) and loaded.config == adapter.config
    hint = torch.rand(1, 3, 32, 32)
    for a, b in zip(loaded(hint), adapter(hint)):
        torch.testing.assert_close(a, b)
    assert isinstance(weights.load_control_model(folder / "cn_a.safetensors"), ControlNet)
    from safetensors.torch import save_file
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors is neither a ControlNet nor a T2I-Adapter: it looks like "
                                         "a Stable Diffusion checkpoint"):
        weights.load_control_model(tmp_path / "other.safetensors")


def test_adapter_files_are_listed_loaded_and_checked(sd, tmp_path):
    from plainsd.runtime import Engine
    weights.save_adapter(random_adapter(sd.unet.config), tmp_path / "t2iadapter_canny_sd15v2.safetensors")
    assert control.list_controlnets(tmp_path)["t2iadapter_canny_sd15v2"] == tmp_path / "t2iadapter_canny_sd15v2.safetensors"
    (net,) = control.load_controlnets(Engine(sd), (ControlUnit("t2iadapter_canny_sd15v2"),), tmp_path)
    from plainsd.models.t2i_adapter import T2IAdapter
    assert isinstance(net, T2IAdapter) and net.dtype == sd.unet.dtype  # readied as a ControlNet is
    other = random_adapter(dataclasses.replace(sd.unet.config, model_channels=64))
    with pytest.raises(ValueError, match=r"the T2I-Adapter 'a' is for another kind of model: its feature maps have "
                                         r"\(channels, times smaller than the latent\) \[\(64, 1\), \(128, 2\)\]; "
                                         r"this model's UNet takes \[\(32, 1\), \(64, 2\)\] \(an SD"):
        control._check_fits(other, sd.unet.config, "a")
    short = T2IAdapter(dataclasses.replace(other.config, channels=(32,)))
    with pytest.raises(ValueError, match=r"'a' gives 1 feature maps; this model's UNet takes 2 \(or 3, the last for "
                                         r"its middle block\)"):
        control._check_fits(short, sd.unet.config, "a")


def test_adapter_scales_halves_and_features_once(sd):
    """Balanced: weight x features; soft: weight x the extension's (0.25, 0.62, 0.825, 1.0), the last ones for the
    tiny UNet's two levels; cfg injection: none on the unconditional rows. The adapter runs once for the pass."""
    adapter = random_adapter(sd.unet.config)
    x, context, hint = _inputs(sd, 4)  # batch 2, guided
    with torch.no_grad():
        plain = adapter(hint)
    runs = []
    adapter.register_forward_hook(lambda *a: runs.append(1))
    for soft, cond_only, scales in ((False, False, (0.7, 0.7)), (True, False, (0.7 * 0.825, 0.7)),
                                    (True, True, (0.7 * 0.825, 0.7))):
        runs.clear()
        spy = AdapterSpy()
        wrapped = control.ControlledUNet(spy, [_unit(adapter, hint, 0.7, soft=soft, cond_only=cond_only)],
                                         torch.tensor([900.0, 500.0, 100.0]), batch=2, parts=1)
        for t in (900.0, 500.0, 100.0):
            wrapped(x, torch.tensor(t), context)
        assert len(runs) == 1 and all(c is None for c, _ in spy.calls)
        for got, p, scale in zip(spy.calls[-1][1], plain, scales):
            expected = (p * scale).expand(4, -1, -1, -1).clone()
            if cond_only:
                expected[:2] = 0
            torch.testing.assert_close(got.expand(4, -1, -1, -1), expected, rtol=1e-5, atol=1e-6)
    full = control.ActiveUnit(adapter, hint, 2.0, 0, 1, soft=True, cond_only=False)
    assert full.scales(4) == [0.5, 1.24, 1.65, 2.0]  # SD's four levels


def test_grey_adapters_read_the_first_channel(sd):
    adapter = random_adapter(sd.unet.config, hint_channels=1)
    x, context, hint = _inputs(sd, 1)
    spy = AdapterSpy()
    control.ControlledUNet(spy, [_unit(adapter, hint)], torch.tensor([500.0]), 1, 1)(x, torch.tensor(500.0), context)
    with torch.no_grad():
        expected = adapter(hint[:, :1])
    for got, e in zip(spy.calls[0][1], expected):
        torch.testing.assert_close(got, e)


def test_a_controlnet_and_an_adapter_together_give_each_its_part(sd):
    net, adapter = random_controlnet(sd.unet.config), random_adapter(sd.unet.config)
    x, context, hint = _inputs(sd, 2)
    t, ts = torch.tensor(300.0), torch.tensor([900.0, 300.0])
    got = []
    for units in ([_unit(net, hint, 0.5)], [_unit(adapter, hint, 1.5, soft=True)],
                  [_unit(net, hint, 0.5), _unit(adapter, hint, 1.5, soft=True)]):
        spy = AdapterSpy()
        control.ControlledUNet(spy, units, ts, batch=1, parts=1)(x, t, context)
        got.append(spy.calls[0])
    (cn_only, none), (none2, ad_only), (cn_both, ad_both) = got
    assert none is None and none2 is None
    for a, b in zip(cn_only, cn_both):
        torch.testing.assert_close(a, b)
    for a, b in zip(ad_only, ad_both):
        torch.testing.assert_close(a, b)
    # and through the real UNet: both at once = the UNet given both
    wrapped = control.ControlledUNet(sd.unet, [_unit(net, hint, 0.5), _unit(adapter, hint, 1.5, soft=True)], ts, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x, t, context), sd.unet(x, t, context, control=cn_both, adapter=ad_both))
        assert not torch.allclose(sd.unet(x, t, context, control=cn_both), sd.unet(x, t, context, control=cn_both,
                                                                                   adapter=ad_both))


def test_adapter_units_of_three_and_four_maps_sum_each_map():
    """An adapter with a map for the middle block beside one without: each map is the sum of the units that give
    it, the middle one the second unit's alone (weights 1 and 2)."""
    maps = [torch.ones(1, 4, 2, 2) * (i + 1) for i in range(4)]
    units = [_unit(None, None), _unit(None, None, weight=2.0)]
    units[0].features, units[1].features = maps[:3], maps
    total = control._adapter_sum(units, torch.zeros(1, 4, 4, 4), torch.ones(1, 1, 1, 1))
    assert [float(t.max()) for t in total] == [3.0, 6.0, 9.0, 8.0]


def test_adapter_levels_fit_latents_of_any_multiple_of_8_px(sd):
    """72 x 40 px: latents 9 x 5, then 5 x 3 (the UNet halves rounding up; so does the adapter)."""
    adapter = random_adapter(sd.unet.config)
    torch.manual_seed(1)
    x, context = torch.randn(1, 4, 5, 9), torch.randn(1, 77, sd.unet.config.context_dim)
    hint = torch.rand(1, 3, 40, 72)
    wrapped = control.ControlledUNet(sd.unet, [_unit(adapter, hint)], torch.tensor([500.0]), 1, 1)
    with torch.no_grad():
        features = adapter(hint)
        assert [f.shape[-2:] for f in features] == [(5, 9), (3, 5)]
        torch.testing.assert_close(wrapped(x, torch.tensor(500.0), context),
                                   sd.unet(x, torch.tensor(500.0), context, adapter=features))
    wrong = control.ControlledUNet(sd.unet, [_unit(adapter, torch.rand(1, 3, 32, 72))], torch.tensor([500.0]), 1, 1)
    with pytest.raises(ValueError, match=r"feature map is \[32, 4, 9\] .* the UNet's features are \[32, 5, 9\]: "
                                         r".* or its hint is not 8 times the latent's size"):
        wrong(x, torch.tensor(500.0), context)


def test_deepcache_gives_the_adapter_features_to_the_blocks_a_call_runs(sd):
    """Tiny UNet: the first level's features go in after input block 1. After the same whole call, a cheap call of
    depth 2 (blocks 0-1) with the features differs from one without; of depth 1 (block 0 only) it does not."""
    from plainsd.fast import DeepCacheUNet
    adapter = random_adapter(sd.unet.config)
    x, context, hint = _inputs(sd, 1)
    t = torch.tensor([400.0])
    cheap = {}
    with torch.no_grad():
        features = [f * 2 for f in adapter(hint)]
        for depth in (1, 2):
            cache = DeepCacheUNet(sd.unet, interval=2, depth=depth)
            for given in (features, None):
                cache.reset()
                whole = cache(x, t, context, adapter=features)
                cheap[depth, given is None] = cache(x, t, context, adapter=given)
        torch.testing.assert_close(whole, sd.unet(x, t, context, adapter=features))
    torch.testing.assert_close(cheap[1, False], cheap[1, True])
    assert not torch.allclose(cheap[2, False], cheap[2, True])
