"""The noise schedule and sigma schedules: SD's constants, diffusers' timesteps and forward process."""

import pytest
import torch

from plainsd.diffusion import schedules as sch
from plainsd.diffusion.guidance import CFGDenoiser

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_sd_betas_and_sigma_range():
    betas = sch.betas_scaled_linear()
    assert len(betas) == 1000 and abs(float(betas[0]) - 0.00085) < 1e-12 and abs(float(betas[-1]) - 0.012) < 1e-12
    sigmas = sch.sigmas_from_alphas_cumprod(sch.alphas_cumprod())
    assert abs(float(sigmas[0]) - 0.0292) < 1e-4 and abs(float(sigmas[-1]) - 14.6146) < 1e-3  # A1111's sigma range


def test_alphas_cumprod_and_forward_process_match_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(**SD_BETAS)
    assert torch.allclose(sch.alphas_cumprod(), ref.alphas_cumprod, rtol=1e-5)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(sch.add_noise(x0, noise, t, ref.alphas_cumprod), ref.add_noise(x0, noise, t), atol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 20, 50])
def test_timestep_spacing_matches_diffusers(spacing, n):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**SD_BETAS, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(n)
    assert sch.timesteps_spaced(n, spacing).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("name", sch.SCHEDULES)
@pytest.mark.parametrize("n", [1, 4, 25])
def test_every_schedule_is_decreasing_and_ends_at_zero(name, n):
    table = sch.sigmas_from_alphas_cumprod(sch.alphas_cumprod())
    s = sch.get_sigmas(name, n, table)
    assert s.shape == (n + 1,) and s[-1] == 0 and (s[:-1] > 0).all()
    assert (s[1:] < s[:-1]).all(), s
    assert float(s[0]) <= float(table[-1]) * 1.0001


def test_schedule_values():
    table = sch.sigmas_from_alphas_cumprod(sch.alphas_cumprod())
    simple = sch.get_sigmas("simple", 4, table)
    assert torch.allclose(simple[:-1], table[[999, 749, 499, 249]])
    ddim = sch.get_sigmas("ddim", 4, table)
    assert torch.allclose(ddim[:-1], table[[751, 501, 251, 1]])
    assert torch.allclose(sch.get_sigmas("Karras", 4, table), sch.get_sigmas_karras(4, float(table[0]), float(table[-1])))
    sgm = sch.get_sigmas("sgm_uniform", 4, table)
    assert abs(float(sgm[0]) - float(table[-1])) < 1e-3 and sgm[-2] > table[0]


def test_unknown_schedule_lists_known_ones():
    with pytest.raises(ValueError, match="unknown schedule 'beta'; known schedules: automatic, uniform, karras"):
        sch.get_sigmas("beta", 10, torch.linspace(0.03, 14.6, 1000))
    with pytest.raises(ValueError, match="at least 1"):
        sch.get_sigmas("karras", 0, torch.linspace(0.03, 14.6, 1000))


class _Counting:
    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, cond):
        self.batches.append(x.shape[0])
        return x * 0 + cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


def test_cfg_one_batch_and_skipped_at_scale_one():
    inner = _Counting()
    x, s = torch.zeros(2, 4, 8, 8), torch.tensor([1.0, 1.0])
    cond, uncond = torch.ones(2, 77, 8), torch.zeros(2, 77, 8)
    out = CFGDenoiser(inner, 7.5)(x, s, cond=cond, uncond=uncond)
    assert inner.batches == [4]  # cond and uncond together
    assert torch.allclose(out, torch.full_like(out, 7.5))  # 0 + 7.5 * (1 - 0)
    CFGDenoiser(inner, 1.0)(x, s, cond=cond, uncond=uncond)
    assert inner.batches[-1] == 2


def test_cfg_can_stop_early():
    inner = _Counting()
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    cfg = CFGDenoiser(inner, 5.0, sigmas, guidance_until=0.5)
    x, cond, uncond = torch.zeros(1, 4, 8, 8), torch.ones(1, 77, 8), torch.zeros(1, 77, 8)
    for s in sigmas[:-1]:
        cfg(x, s.reshape(1), cond=cond, uncond=uncond)
    assert inner.batches == [2, 2, 1, 1]


def test_training_loss_weights_are_a_weighted_mean_over_latent_pixels():
    from plainsd.diffusion.denoisers import training_loss

    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731 - predicts no noise: the loss is the noise's own size
    plain = training_loss(zero, x0, None, timesteps=t, noise=noise)
    assert torch.allclose(plain, (noise ** 2).mean())
    assert torch.allclose(training_loss(zero, x0, None, timesteps=t, noise=noise, weights=torch.full((2, 1, 8, 8), 4.0)), plain)
    left = torch.zeros(2, 1, 8, 8)
    left[..., :4] = 1
    assert torch.allclose(training_loss(zero, x0, None, timesteps=t, noise=noise, weights=left), (noise[..., :4] ** 2).mean())


def test_training_loss_min_snr_gamma_weights_each_sample_by_its_timestep():
    from plainsd.diffusion import schedules
    from plainsd.diffusion.denoisers import training_loss

    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 300, 900])  # SNR far above 5, about 1.4, far below 1
    ac = schedules.alphas_cumprod()[t]
    snr = ac / (1 - ac)
    assert snr[0] > 5 and snr[2] < 1
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    per_sample = (noise ** 2).mean(dim=(1, 2, 3))
    eps_w = torch.clamp(snr, max=5.0) / snr  # below 1 only where SNR > 5
    assert eps_w[1] == 1 and eps_w[2] == 1 and eps_w[0] < 0.1
    got = training_loss(zero, x0, None, timesteps=t, noise=noise, snr_gamma=5.0)
    assert torch.allclose(got, (per_sample * eps_w).mean())
    # v-prediction: min(SNR, gamma) / (SNR + 1) on the v target
    v = ac.sqrt()[:, None, None, None] * noise - (1 - ac).sqrt()[:, None, None, None] * x0
    got_v = training_loss(zero, x0, None, "v", timesteps=t, noise=noise, snr_gamma=5.0)
    assert torch.allclose(got_v, ((v ** 2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / (snr + 1)).mean())
    # x0-prediction: min(SNR, gamma) on the clean-sample target
    got_x0 = training_loss(zero, x0, None, "x0", timesteps=t, noise=noise, snr_gamma=5.0)
    assert torch.allclose(got_x0, ((x0 ** 2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0)).mean())
    # with per-pixel weights as well: both apply
    left = torch.zeros(3, 1, 8, 8)
    left[..., :4] = 1
    got_w = training_loss(zero, x0, None, timesteps=t, noise=noise, weights=left, snr_gamma=5.0)
    assert torch.allclose(got_w, ((noise[..., :4] ** 2).mean(dim=(1, 2, 3)) * eps_w).mean())


def test_sample_timesteps_uniform_and_cubic():
    g = torch.Generator().manual_seed(0)
    uniform = sch.sample_timesteps(200_000, g)
    cubic = sch.sample_timesteps(200_000, torch.Generator().manual_seed(0), "cubic")
    for t in (uniform, cubic):
        assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    # E[t] = T/2 - 1/2 for the uniform draw; E[(1 - u^3) T] = 3T/4 before flooring (half a step lower after)
    assert uniform.float().mean().item() == pytest.approx(499.5, abs=2)
    assert cubic.float().mean().item() == pytest.approx(749.5, abs=2)
    # P(t < 500) is 1/2 for the uniform draw and P(u^3 > 1/2) = 1 - 0.5^(1/3) = 0.206 for the cubic one
    assert (cubic < 500).float().mean().item() == pytest.approx(1 - 0.5 ** (1 / 3), abs=0.005)
    # the uniform draw is the one DDPM's loss always made: torch.randint over the 1000 training steps
    assert torch.equal(uniform, torch.randint(0, 1000, (200_000,), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="'uniform' or 'cubic'"):
        sch.sample_timesteps(4, g, "logit-normal")
