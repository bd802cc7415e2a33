"""A1111's variation seeds, seed resize, ENSD, tiling and the samplers' noise settings, through the pipeline."""

import numpy as np
import pytest
import torch

import plainsd
from plainsd import pipeline, runtime
from plainsd.diffusion.noise import ImageNoise
from plainsd.fast import FastSettings
from plainsd.models.taesd import TinyDecoder
from plainsd.pnginfo import parse_infotext


@pytest.fixture(scope="module")
def sd():
    return plainsd.build("tiny", seed=0)


def _arr(image):
    return np.asarray(image, dtype=np.int16)


def _start(sd, **kwargs):
    """The latents the sampler starts from (Euler reports them before its first step) and the result."""
    seen = []
    result = pipeline.txt2img(sd, "a red circle", steps=3, sampler="Euler", callback=lambda s: seen.append(s), **kwargs)
    first = seen[0]
    return first.latents / first.sigma, result


def _randn(seed, shape=(4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_variation_strength_0_is_the_seed_and_1_the_subseeds_noise(sd):
    plain = pipeline.txt2img(sd, "a red circle", steps=3, seed=3)
    zero = pipeline.txt2img(sd, "a red circle", steps=3, seed=3, subseed=9, subseed_strength=0.0)
    assert np.array_equal(_arr(plain.images[0]), _arr(zero.images[0]))  # bit for bit
    assert "Variation seed" not in parse_infotext(zero.infotexts[0])
    noise, _ = _start(sd, seed=3, subseed=9, subseed_strength=1.0)
    assert torch.allclose(noise[0], _randn(9), atol=1e-6)  # the subseed's noise (to the float rounding of x / sigma)
    noise, result = _start(sd, seed=3, subseed=9, subseed_strength=0.25)
    expected = torch.stack([torch.stack([_by_hand(0.25, _randn(3)[c, :, j], _randn(9)[c, :, j]) for j in range(8)], 1)
                            for c in range(4)])
    assert torch.allclose(noise[0], expected.float(), atol=1e-5)
    fields = parse_infotext(result.infotexts[0])
    assert (fields["Seed"], fields["Variation seed"], fields["Variation seed strength"]) == ("3", "9", "0.25")


def _by_hand(t, a, b):
    """Slerp of two of A1111's vectors (a channel's column), in float64."""
    a, b = a.double(), b.double()
    omega = torch.acos(a @ b / (a.norm() * b.norm()))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def test_a_batch_keeps_the_seed_and_counts_the_subseed(sd):
    r = pipeline.txt2img(sd, "a red circle", steps=3, seed=20, subseed=100, subseed_strength=0.5, batch_size=2,
                         batch_count=2)
    assert r.seeds == [20] * 4 and r.subseeds == [100, 101, 102, 103]  # as A1111: all_seeds fixed, subseed + i
    assert [parse_infotext(t)["Variation seed"] for t in r.infotexts] == ["100", "101", "102", "103"]
    alone = pipeline.txt2img(sd, "a red circle", steps=3, seed=20, subseed=103, subseed_strength=0.5)
    assert np.abs(_arr(alone.images[0]) - _arr(r.images[3])).max() <= 1  # (batched sums may round differently)
    assert not np.array_equal(_arr(r.images[0]), _arr(r.images[1]))
    plain = pipeline.txt2img(sd, "a red circle", steps=3, seed=20, subseed=100, batch_size=2)
    assert plain.seeds == [20, 21] and plain.subseeds == [100, 101]  # strength 0: seed + i as ever
    rnd = pipeline.txt2img(sd, "x", steps=1, seed=1, subseed=-1, subseed_strength=0.1)
    assert 0 <= rnd.subseeds[0] <= plainsd.request.MAX_SEED


def test_seed_resize(sd):
    plain = pipeline.txt2img(sd, "a red circle", steps=3, seed=4)
    same = pipeline.txt2img(sd, "a red circle", steps=3, seed=4, seed_resize_from_w=64, seed_resize_from_h=64)
    assert np.array_equal(_arr(plain.images[0]), _arr(same.images[0]))  # from the same size: a no-op
    noise, result = _start(sd, seed=4, seed_resize_from_w=32, seed_resize_from_h=48)
    assert torch.allclose(noise[0, :, 1:7, 2:6], _randn(4, (4, 6, 4)), atol=1e-6)  # the 4x6 noise in the middle
    assert torch.allclose(noise[0, :, 0], _randn(4)[:, 0], atol=1e-6)  # the 8x8 noise around it
    assert parse_infotext(result.infotexts[0])["Seed resize from"] == "32x48"
    with pytest.raises(ValueError, match="seed_resize_from_w and seed_resize_from_h must both"):
        pipeline.txt2img(sd, "x", steps=1, seed_resize_from_w=32)


def test_ensd_restarts_the_samplers_noise_only(sd):
    a = pipeline.txt2img(sd, "a red circle", steps=3, seed=5, sampler="Euler a")
    b = pipeline.txt2img(sd, "a red circle", steps=3, seed=5, sampler="Euler a", eta_noise_seed_delta=31337)
    assert np.abs(_arr(a.images[0]) - _arr(b.images[0])).max() > 10
    assert parse_infotext(b.infotexts[0])["ENSD"] == "31337" and "ENSD" not in parse_infotext(a.infotexts[0])
    c = pipeline.txt2img(sd, "a red circle", steps=3, seed=5, sampler="Euler")
    d = pipeline.txt2img(sd, "a red circle", steps=3, seed=5, sampler="Euler", eta_noise_seed_delta=31337)
    assert np.array_equal(_arr(c.images[0]), _arr(d.images[0])) and "ENSD" not in parse_infotext(d.infotexts[0])


def test_the_nv_source_draws_an_nvidia_gpus_numbers(sd):
    """RNG source NV: the starting noise is the seed's first Philox draw, an ancestral sampler's noise its next ones;
    the infotext says RNG: NV, GPU (A1111's default, torch's CPU numbers here) is not written, an unknown one refused."""
    from plainsd.diffusion.philox import PhiloxGenerator

    noise, result = _start(sd, seed=3, randn_source="NV")
    assert torch.allclose(noise[0], PhiloxGenerator(3).randn((4, 8, 8)), atol=1e-6)
    assert parse_infotext(result.infotexts[0])["RNG"] == "NV"
    gpu = pipeline.txt2img(sd, "a red circle", steps=3, seed=3, sampler="Euler a")
    cpu = pipeline.txt2img(sd, "a red circle", steps=3, seed=3, sampler="Euler a", randn_source="CPU")
    nv = pipeline.txt2img(sd, "a red circle", steps=3, seed=3, sampler="Euler a", randn_source="NV")
    assert np.array_equal(_arr(gpu.images[0]), _arr(cpu.images[0])) and "RNG" not in parse_infotext(gpu.infotexts[0])
    assert parse_infotext(cpu.infotexts[0])["RNG"] == "CPU"
    # the ancestral steps' noise: Euler a by hand from the NV noise gives the NV picture
    steps = []
    pipeline.txt2img(sd, "a red circle", steps=3, seed=3, sampler="Euler a", randn_source="NV",
                     callback=lambda s: steps.append(s))
    g = PhiloxGenerator(3)
    g.randn((4, 8, 8))
    sigma_down, sigma_up = _ancestral(steps[0].sigma, steps[1].sigma)
    d = (steps[0].latents - steps[0].denoised) / steps[0].sigma
    by_hand = steps[0].latents + d * (sigma_down - steps[0].sigma) + g.randn((4, 8, 8)) * sigma_up
    assert torch.allclose(steps[1].latents, by_hand, atol=1e-5)
    assert np.abs(_arr(nv.images[0]) - _arr(gpu.images[0])).max() > 10
    with pytest.raises(ValueError, match="randn_source .* must be one of GPU, CPU, NV, got 'cuda'"):
        pipeline.txt2img(sd, "x", steps=1, randn_source="cuda")


def test_dpm2_runs_a1111s_schedule_without_its_next_to_last_sigma(sd):
    """txt2img and the hires fix's pass with DPM2: the steps' sigmas are a Karras schedule one longer, its
    next-to-last sigma left out (A1111's discard_next_to_last_sigma)."""
    from plainsd.diffusion import samplers as S
    from plainsd.diffusion.denoisers import DiscreteDenoiser

    seen = []
    pipeline.txt2img(sd, "a red circle", steps=4, seed=1, sampler="DPM2", callback=lambda s: seen.append(s.sigma),
                     hires=pipeline.HiresFix(scale=1.5, steps=3, strength=0.5))
    karras = DiscreteDenoiser(None).get_sigmas(5, "karras")
    assert torch.allclose(torch.tensor(seen[:4]), karras[:4], atol=1e-5)  # (then from karras[3] to 0)
    stretched = DiscreteDenoiser(None).get_sigmas(int(3 / 0.5) + 1, "karras")  # the hires pass' last 3 of 6
    assert torch.allclose(torch.tensor(seen[4:]), stretched[3:6], atol=1e-5)
    assert len(S.schedule_sigmas(DiscreteDenoiser(None), S.SAMPLERS["DPM2"], 4, "karras")) == 5


def test_ngms_skips_the_negative_prompt_and_says_so(sd):
    """A1111's negative guidance minimum sigma: a threshold above every sigma skips every second call's negative
    prompt (NGMS in the infotext); one below every sigma changes nothing and is not written."""
    plain = pipeline.txt2img(sd, "a red circle", steps=3, seed=2, sampler="Euler")
    skipping = pipeline.txt2img(sd, "a red circle", steps=3, seed=2, sampler="Euler", s_min_uncond=100.0)
    unreached = pipeline.txt2img(sd, "a red circle", steps=3, seed=2, sampler="Euler", s_min_uncond=0.01)
    assert np.abs(_arr(skipping.images[0]) - _arr(plain.images[0])).max() > 0
    assert parse_infotext(skipping.infotexts[0])["NGMS"] == "100"
    assert np.array_equal(_arr(unreached.images[0]), _arr(plain.images[0]))
    assert "NGMS" not in parse_infotext(unreached.infotexts[0])
    with pytest.raises(ValueError, match="s_min_uncond .* must be a number of at least 0, got -1"):
        pipeline.txt2img(sd, "x", steps=1, s_min_uncond=-1)


def _ancestral(sigma, sigma_next):
    up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def test_sampler_settings_are_honoured_written_or_refused(sd):
    plain = pipeline.txt2img(sd, "a red circle", steps=4, seed=6, sampler="Euler")
    churn = pipeline.txt2img(sd, "a red circle", steps=4, seed=6, sampler="Euler", s_churn=2.0, s_noise=1.1)
    again = pipeline.txt2img(sd, "a red circle", steps=4, seed=6, sampler="Euler", s_churn=2.0, s_noise=1.1)
    assert np.array_equal(_arr(churn.images[0]), _arr(again.images[0]))  # its noise: the seed's generator
    assert np.abs(_arr(plain.images[0]) - _arr(churn.images[0])).max() > 10
    f = parse_infotext(churn.infotexts[0])
    assert (f["Sigma churn"], f["Sigma noise"]) == ("2", "1.1") and "Sigma tmax" not in f
    f = parse_infotext(pipeline.txt2img(sd, "x", steps=2, seed=1, sampler="Euler a", eta=0.5).infotexts[0])
    assert f["Eta"] == "0.5"
    assert "Eta" not in parse_infotext(pipeline.txt2img(sd, "x", steps=2, seed=1, sampler="Euler a").infotexts[0])
    f = parse_infotext(pipeline.txt2img(sd, "x", steps=2, seed=1, sampler="DDIM", eta=0.3).infotexts[0])
    assert f["Eta DDIM"] == "0.3"
    with pytest.raises(ValueError, match="s_churn is for the samplers Euler, Heun, DPM2; DPM\\+\\+ 2M does not"):
        pipeline.txt2img(sd, "x", steps=2, sampler="DPM++ 2M", s_churn=1.0)
    with pytest.raises(ValueError, match="eta is for the samplers"):
        pipeline.txt2img(sd, "x", steps=2, sampler="LMS", eta=0.5)
    pipeline.txt2img(sd, "x", steps=1, sampler="DPM++ 2M", s_churn=0.0, s_noise=1.0)  # values that change nothing


def _rolled_noise(monkeypatch, shift=(2, 4)):
    """Make every run's starting noise rolled by `shift` latents."""
    draw = ImageNoise.draw

    def rolled(self, shape, seeds, subseeds=None):
        noise, generators = draw(self, shape, seeds, subseeds)
        return noise.roll(shift, dims=(2, 3)), generators

    monkeypatch.setattr(ImageNoise, "draw", rolled)


def _picture(model, tiling, **kwargs):
    result = pipeline.txt2img(model, "a red circle", steps=4, seed=1, sampler="Euler", tiling=tiling, **kwargs)
    return _arr(result.images[0])


def test_a_tiled_picture_wraps_and_the_untiled_one_is_unchanged(sd, monkeypatch):
    """With every convolution padding circularly, the picture has no edges: noise rolled by (2, 4) latents gives
    the picture rolled by (16, 32) pixels, so its left and right (top and bottom) edges meet as any two inner
    columns do. Without tiling the edges are edges: the rolled noise draws another picture."""
    untiled, tiled = _picture(sd, False), _picture(sd, True)
    with monkeypatch.context() as m:
        _rolled_noise(m)
        untiled_rolled, tiled_rolled = _picture(sd, False), _picture(sd, True)
    seam_tiled = np.abs(np.roll(tiled, (16, 32), axis=(0, 1)) - tiled_rolled).mean()
    seam_untiled = np.abs(np.roll(untiled, (16, 32), axis=(0, 1)) - untiled_rolled).mean()
    assert seam_tiled < 0.5 and seam_untiled > 10  # measured: 0 and 27 levels
    assert parse_infotext(pipeline.txt2img(sd, "x", steps=1, tiling=True).infotexts[0])["Tiling"] == "True"
    assert np.array_equal(_picture(sd, False), untiled)  # the convolutions are as before the tiled run

    def fail(step):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        _picture(sd, True, callback=fail)
    assert all(m.padding_mode == "zeros" for m in sd.modules() if isinstance(m, torch.nn.Conv2d))
    assert np.array_equal(_picture(sd, False), untiled)  # also after a run that failed


def test_tiling_with_packed_weights_and_a_tiny_decoder(monkeypatch):
    """The prepared runtime swaps convolutions for packed ones (runtime/packing.py): they pad circularly too."""
    engine = runtime.prepare(plainsd.build("tiny", seed=0))
    if not any(isinstance(m, runtime.PackedConv2d) for m in engine.sd.unet.modules()):
        pytest.skip("no packed convolutions on this torch")
    eager = plainsd.build("tiny", seed=0)
    assert np.abs(_picture(engine, True) - _picture(eager, True)).max() <= 2  # packed sums may round otherwise
    tiled = _picture(engine, True)
    engine.use_tiny_decoder(TinyDecoder(width=8))
    tiny = FastSettings(deepcache_interval=1, guidance_until=1.0, tiny_decoder=True)
    tiled_tiny = _picture(engine, True, fast=tiny)
    with monkeypatch.context() as m:
        _rolled_noise(m)
        assert np.abs(np.roll(tiled, (16, 32), axis=(0, 1)) - _picture(engine, True)).mean() < 0.5
        # the random tiny decoder draws faint pictures; measured: 0 tiled, 1.4 levels untiled
        assert np.abs(np.roll(tiled_tiny, (16, 32), axis=(0, 1)) - _picture(engine, True, fast=tiny)).mean() < 0.05
        assert np.abs(np.roll(tiled_tiny, (16, 32), axis=(0, 1)) - _picture(engine, False, fast=tiny)).mean() > 0.5


def test_tiling_refused_where_it_cannot_be_honoured(sd):
    from plainsd.request import GenerationRequest

    with pytest.raises(ValueError, match="tiling needs the eager UNet"):
        GenerationRequest(prompt="x", tiling=True).check(backend="openvino")


def test_tiled_decode_of_a_large_picture_wraps(sd):
    """Latents larger than a decode tile (pipeline.DECODE_TILE): the tiles at the edges see across them."""
    latents = torch.randn(1, 4, 8, 24, generator=torch.Generator().manual_seed(0)) * 2
    with pipeline._tiling(runtime.Engine(sd), True):
        whole = sd.vae.decode(latents)  # circular everywhere: exactly seamless
        wrapped = sd.vae.decode_tiled(latents, 8, 4, wrap=True)
        plain = sd.vae.decode_tiled(latents, 8, 4)
    edges, inner = [*range(8), *range(184, 192)], list(range(8, 184))  # the first and last latent's pixel columns
    err_wrapped = float((wrapped - whole)[..., edges].abs().mean())
    err_plain = float((plain - whole)[..., edges].abs().mean())
    err_inner = float((wrapped - whole)[..., inner].abs().mean())  # what decoding by tiles costs anywhere
    # measured: edges 0.10 wrapped, 0.27 not; 0.11 inside
    assert err_wrapped < 0.6 * err_plain and err_wrapped < 1.5 * err_inner, (err_wrapped, err_plain, err_inner)


def test_latent_noise_fill_is_the_seeds_alone(sd, monkeypatch):
    """Inpainting's "latent noise" fills the mask with noise A1111 draws from the seed alone: a variation seed or
    seed resize changes the run's noise, not the fill (the sampler's start x0, caught here)."""
    from PIL import Image

    def start(**fields):
        seen = []
        monkeypatch.setattr(pipeline, "_sample", lambda model, p, x, x0, *args: (seen.append(x0), (x0, True))[1])
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        pipeline.inpaint(sd, Image.new("RGB", (64, 64), (90, 120, 40)), mask, "x", steps=4, seed=5, mask_blur=0,
                         inpainting_fill="latent noise", **fields)
        monkeypatch.undo()
        return seen[0]

    plain = start()
    assert torch.equal(start(subseed=9, subseed_strength=1.0), plain)
    assert torch.equal(start(seed_resize_from_w=32, seed_resize_from_h=32), plain)
    assert torch.equal(plain[0, :, 2:6, 2:6], _randn(5)[:, 2:6, 2:6])  # the seed's noise in the mask


def test_the_hires_samplers_settings_are_in_the_infotext_and_tiling_reaches_its_upscaler(sd, monkeypatch):
    # A1111 writes the infotext once both passes have run: an eta or ENSD only the hires sampler uses is recorded
    hires = pipeline.HiresFix(scale=1.5, upscaler="Lanczos", steps=2, strength=0.5, sampler="Euler a")
    fields = parse_infotext(pipeline.txt2img(sd, "x", steps=2, seed=1, sampler="DPM++ 2M", eta=0.3,
                                             eta_noise_seed_delta=31337, hires=hires).infotexts[0])
    assert (fields["Eta"], fields["ENSD"], fields["Hires sampler"]) == ("0.3", "31337", "Euler a")
    # each pass's sampler takes the eta setting of its own kind: DDIM eta_ddim, Euler a eta_ancestral
    request = pipeline.GenerationRequest(sampler="DDIM", eta_ancestral=0.5, eta_ddim=0.2)
    ddim, euler_a = (pipeline.S.resolve_sampler(name)[0] for name in ("DDIM", "Euler a"))
    assert (request.sampler_options(ddim)["eta"], request.sampler_options(euler_a)["eta"]) == (0.2, 0.5)
    decoded = []
    decode = pipeline.decode
    monkeypatch.setattr(pipeline, "decode", lambda *a, **k: (decoded.append(k.get("wrap")), decode(*a, **k))[1])
    pipeline.txt2img(sd, "x", steps=2, seed=1, tiling=True, hires=pipeline.HiresFix(upscaler="Lanczos", steps=1))
    assert decoded == [True, True]  # the image upscaler's decode and the final one
