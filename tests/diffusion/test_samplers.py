"""Samplers: same numbers as k-diffusion and diffusers on the same denoiser and noise; right answers on Gaussian data."""

import hashlib
import math

import pytest
import torch

from plainsd.diffusion import samplers as S
from plainsd.diffusion import schedules
from plainsd.diffusion.denoisers import DiscreteDenoiser, lcm_boundary

TOL = 1e-5


def toy_denoiser(x, sigma, **extra):
    """A smooth, nonlinear stand-in for a network's denoised estimate."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1 + s**2) + 0.5 * s / (1 + s**2) * torch.tanh(x) + 0.1 * torch.sin(3 * x) / (1 + s)


class PairNoise:
    """Noise that depends only on (sigma, sigma_next), so two samplers get identical noise."""

    def __init__(self, shape):
        self.shape = shape

    def __call__(self, sigma, sigma_next):
        key = f"{float(sigma):.6e}:{float(sigma_next):.6e}".encode()
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:7], "little"))
        return torch.randn(self.shape, generator=g)


class SeqNoise:
    """Noise drawn in sequence from one generator, as diffusers' schedulers draw it."""

    def __init__(self, shape, seed):
        self.shape, self.g = shape, torch.Generator().manual_seed(seed)

    def __call__(self, *args):
        return torch.randn(self.shape, generator=self.g)


K_SAMPLERS = [
    ("euler", {}), ("euler_ancestral", {"noise": True}), ("heun", {}), ("dpm_2", {}),
    ("dpm_2_ancestral", {"noise": True}), ("lms", {}), ("dpmpp_2s_ancestral", {"noise": True}),
    ("dpmpp_sde", {"noise": True}), ("dpmpp_2m", {}), ("dpmpp_2m_sde", {"noise": True}),
    ("dpmpp_2m_sde", {"noise": True, "solver_type": "heun"}), ("dpmpp_3m_sde", {"noise": True}),
    ("euler_ancestral", {"noise": True, "eta": 0.5}), ("dpmpp_2m_sde", {"noise": True, "eta": 0.0}),
    ("euler_ancestral", {"noise": True, "s_noise": 0.7}), ("dpm_2_ancestral", {"noise": True, "s_noise": 1.2}),
    ("dpmpp_2s_ancestral", {"noise": True, "eta": 0.6, "s_noise": 0.8}), ("dpmpp_sde", {"noise": True, "s_noise": 0.9}),
]


@pytest.mark.parametrize("name,opts", K_SAMPLERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(K_SAMPLERS)])
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
def test_same_as_k_diffusion(name, opts, schedule, record_parity):
    kd = pytest.importorskip("k_diffusion.sampling")
    opts = dict(opts)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    sigmas = getattr(kd, f"get_sigmas_{schedule}")(12, 0.0292, 14.6146)
    kwargs = {k: v for k, v in opts.items() if k != "noise"}
    if opts.get("noise"):
        kwargs["noise_sampler"] = PairNoise(x.shape)
    ref = getattr(kd, f"sample_{name}")(toy_denoiser, x.clone(), sigmas, disable=True, **kwargs)
    ours = getattr(S, f"sample_{name}")(toy_denoiser, x.clone(), sigmas, disable=True, **kwargs)
    d = float((ours - ref).abs().max())
    record_parity(f"sampler {name} {kwargs.get('solver_type', '')}{kwargs.get('eta', '')}{kwargs.get('s_noise', '')} "
                  f"({schedule}) vs k-diffusion", d)
    assert d <= TOL


class _TorchWithNoises:
    """k-diffusion's `torch` with randn_like giving noises from a sequence (as A1111 hands it each image's
    generator): the churn samplers draw their noise that way, not through a noise sampler."""

    def __init__(self, noise):
        self.noise = noise

    def __getattr__(self, name):
        return self.randn_like if name == "randn_like" else getattr(torch, name)

    def randn_like(self, x):
        return self.noise()


CHURN = [("euler", {"s_churn": 1.0}), ("euler", {"s_churn": 4.0, "s_tmin": 0.5, "s_tmax": 5.0, "s_noise": 1.003}),
         ("heun", {"s_churn": 2.0, "s_noise": 0.9}), ("dpm_2", {"s_churn": 3.0, "s_tmin": 0.2, "s_tmax": 8.0})]


@pytest.mark.parametrize("name,opts", CHURN, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CHURN)])
def test_churn_same_as_k_diffusion(name, opts, monkeypatch, record_parity):
    """Karras et al.'s churn (s_churn, s_tmin, s_tmax, s_noise): k-diffusion's numbers on the same noise, which
    both draw at every step (used only where sigma is in [s_tmin, s_tmax])."""
    kd = pytest.importorskip("k_diffusion.sampling")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    sigmas = kd.get_sigmas_karras(10, 0.0292, 14.6146)
    monkeypatch.setattr(kd, "torch", _TorchWithNoises(SeqNoise(x.shape, 5)))
    ref = getattr(kd, f"sample_{name}")(toy_denoiser, x.clone(), sigmas, disable=True, **opts)
    ours = getattr(S, f"sample_{name}")(toy_denoiser, x.clone(), sigmas, disable=True, noise_sampler=SeqNoise(x.shape, 5),
                                        **opts)
    plain = getattr(S, f"sample_{name}")(toy_denoiser, x.clone(), sigmas, disable=True)
    d = float((ours - ref).abs().max())
    record_parity(f"sampler {name} with churn {opts} vs k-diffusion", d)
    assert d <= TOL
    assert float((ours - plain).abs().max()) > 0.1  # the churn changed the result


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_solver_same_as_k_diffusion(name, eta, record_parity):
    kd = pytest.importorskip("k_diffusion.sampling")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 14.6
    extra = {"n": 10} if name == "dpm_fast" else {}
    noise = PairNoise(x.shape)
    ref = getattr(kd, f"sample_{name}")(toy_denoiser, x.clone(), 0.0292, 14.6146, disable=True, eta=eta, noise_sampler=noise, **extra)
    ours = getattr(S, f"sample_{name}")(toy_denoiser, x.clone(), 0.0292, 14.6146, disable=True, eta=eta, noise_sampler=noise, **extra)
    d = float((ours - ref).abs().max())
    record_parity(f"sampler {name} eta={eta} vs k-diffusion", d)
    assert d <= TOL


def test_schedules_same_as_k_diffusion():
    kd = pytest.importorskip("k_diffusion.sampling")
    for n in (1, 7, 30):
        assert torch.allclose(schedules.get_sigmas_karras(n, 0.0292, 14.6146), kd.get_sigmas_karras(n, 0.0292, 14.6146), atol=1e-6)
        assert torch.allclose(schedules.get_sigmas_exponential(n, 0.0292, 14.6146), kd.get_sigmas_exponential(n, 0.0292, 14.6146), atol=1e-6)
        assert torch.allclose(schedules.get_sigmas_polyexponential(n, 0.0292, 14.6146, 2.0),
                              kd.get_sigmas_polyexponential(n, 0.0292, 14.6146, 2.0), atol=1e-6)


def test_a1111s_samplers_that_discard_the_next_to_last_sigma():
    """DPM2, DPM2 a and DPM++ 3M SDE (A1111's discard_next_to_last_sigma): a schedule of steps + 1 with its
    next-to-last sigma left out, so still `steps` steps; the others keep theirs."""
    kd = pytest.importorskip("k_diffusion.sampling")
    denoiser = DiscreteDenoiser(None)
    lo, hi = float(denoiser.sigmas[0]), float(denoiser.sigmas[-1])
    for name, schedule, made in [("DPM2", "karras", kd.get_sigmas_karras), ("DPM2 a", "karras", kd.get_sigmas_karras),
                                 ("DPM++ 3M SDE", "exponential", kd.get_sigmas_exponential)]:
        info = S.SAMPLERS[name]
        sigmas = S.schedule_sigmas(denoiser, info, 6, S.resolve_sampler(name)[1])
        longer = made(7, lo, hi)
        assert len(sigmas) == 7 and torch.allclose(sigmas, torch.cat([longer[:-2], longer[-1:]]), atol=1e-5), name
    for name in ("Euler", "DPM++ 2M", "DDIM"):
        info, schedule = S.resolve_sampler(name)
        assert torch.equal(S.schedule_sigmas(denoiser, info, 6, schedule), denoiser.get_sigmas(6, schedule)), name


class _FakeLDM(torch.nn.Module):
    """What k-diffusion's CompVis wrappers expect of a model: alphas_cumprod and apply_model."""

    def __init__(self, net, ac):
        super().__init__()
        self.net = net
        self.register_buffer("alphas_cumprod", ac)

    def apply_model(self, x, t, cond):
        return self.net(x, t, cond)


def _net(x, t, cond):
    return 0.7 * torch.tanh(x) + 0.2 * x * torch.cos(t.reshape(-1, 1, 1, 1) / 300) + cond


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("quantize", [False, True])
def test_denoisers_and_sigma_table_same_as_k_diffusion(prediction, quantize):
    ext = pytest.importorskip("k_diffusion.external")
    ac = schedules.alphas_cumprod()
    wrapper = (ext.CompVisDenoiser if prediction == "eps" else ext.CompVisVDenoiser)(_FakeLDM(_net, ac), quantize=quantize)
    ours = DiscreteDenoiser(_net, prediction, ac, quantize=quantize)
    x = torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([14.6, 1.234, 0.05])
    assert torch.allclose(ours(x, sigma, cond=0.1), wrapper(x, sigma, cond=0.1), atol=1e-5)
    assert torch.allclose(ours.sigmas, wrapper.sigmas)
    for n in (1, 5, 20):
        assert torch.allclose(ours.get_sigmas(n), wrapper.get_sigmas(n), atol=1e-5)
    t = torch.tensor([0.0, 10.5, 500.25, 999.0])
    assert torch.allclose(schedules.t_to_sigma(t, ours.sigmas), wrapper.t_to_sigma(t), atol=1e-6)
    assert torch.allclose(ours.sigma_to_t(sigma).float(), wrapper.sigma_to_t(sigma).float(), atol=1e-3)


def test_the_three_predictions_give_the_same_clean_estimate():
    """A network that predicts the noise, the velocity or the clean sample itself (x0: SDXL-Lightning's 1-step
    model), each exactly, gives the same denoised estimate (the network sees x in the DDPM scaling)."""
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([7.5, 0.3])
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0 + s * eps
    alpha, sigma_ddpm = 1 / (s**2 + 1) ** 0.5, s / (s**2 + 1) ** 0.5
    outputs = {"eps": eps, "v": alpha * eps - sigma_ddpm * x0, "x0": x0}
    for prediction, out in outputs.items():
        got = DiscreteDenoiser(lambda x_in, t, out=out: out, prediction)(x, sigma)
        assert torch.allclose(got, x0, atol=1e-5), prediction
    with pytest.raises(ValueError, match="prediction must be 'eps', 'v' or 'x0', got 'sample'"):
        DiscreteDenoiser(None, "sample")


# --- against diffusers' schedulers ------------------------------------------------------------------

_AC = schedules.alphas_cumprod()


def _eps_fn(x, t):
    """Close to the exact noise prediction for data of std 0.5, plus a nonlinear term: values stay O(1)."""
    t = torch.as_tensor(t).reshape(-1)
    a = _AC[t.long()].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    tt = t.to(x.dtype).reshape(a.shape)
    return x * (1 - a).sqrt() / (0.25 * a + 1 - a) + 0.1 * torch.tanh(x) * torch.cos(tt / 300)


SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _run_diffusers(scheduler, n, x_ddpm, generator=None, **step_kw):
    scheduler.set_timesteps(n)
    lat = x_ddpm.clone()
    for t in scheduler.timesteps:
        eps = _eps_fn(scheduler.scale_model_input(lat, t), t)
        kw = dict(step_kw)
        if generator is not None:
            kw["generator"] = generator
        lat = scheduler.step(eps, t, lat, **kw).prev_sample
    return lat


def _run_ours(fn, scheduler, sigmas, x_ddpm, boundary=False, **kw):
    den = DiscreteDenoiser(lambda x, t, cond=None: _eps_fn(x, t), "eps", scheduler.alphas_cumprod, quantize=True)
    model = lcm_boundary(den) if boundary else den
    x = x_ddpm * (1 + sigmas[0] ** 2) ** 0.5  # DDPM scaling -> sigma scaling
    out = fn(model, x, sigmas, disable=True, **kw)
    return out / (1 + sigmas[-1] ** 2) ** 0.5  # back to DDPM scaling at the last sigma


def _table(scheduler):
    return ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_same_as_diffusers(eta, record_parity):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = _run_diffusers(sch, 15, x, generator=torch.Generator().manual_seed(5), eta=eta)
    table = _table(sch)
    sigmas = torch.cat([table[sch.timesteps], table[:1]])  # the last step goes to alphas_cumprod[0]
    ours = _run_ours(S.sample_ddim, sch, sigmas, x, eta=eta, noise_sampler=SeqNoise(x.shape, 5))
    d = float((ours - ref).abs().max())
    record_parity(f"sampler DDIM eta={eta} vs diffusers DDIMScheduler", d)
    assert d <= TOL


def test_ddpm_same_as_diffusers(record_parity):
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(**SD_BETAS, clip_sample=False, steps_offset=1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = _run_diffusers(sch, 20, x, generator=torch.Generator().manual_seed(6))
    table = _table(sch)
    sigmas = torch.cat([table[sch.timesteps], torch.zeros(1)])
    ours = _run_ours(S.sample_ddpm, sch, sigmas, x, noise_sampler=SeqNoise(x.shape, 6))
    d = float((ours - ref).abs().max())
    record_parity("sampler DDPM vs diffusers DDPMScheduler", d)
    assert d <= TOL


def test_plms_same_as_diffusers_pndm(record_parity):
    from diffusers import PNDMScheduler

    sch = PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = _run_diffusers(sch, 12, x)
    table = _table(sch)
    steps = torch.unique_consecutive(sch.timesteps)
    sigmas = torch.cat([table[steps], table[:1]])
    ours = _run_ours(S.sample_plms, sch, sigmas, x)
    d = float((ours - ref).abs().max())
    record_parity("sampler PLMS vs diffusers PNDMScheduler", d)
    assert d <= TOL


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_same_as_diffusers(order, record_parity):
    from diffusers import UniPCMultistepScheduler

    sch = UniPCMultistepScheduler(**SD_BETAS, solver_order=order)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    ref = _run_diffusers(sch, 10, x)
    ours = _run_ours(S.sample_unipc, sch, sch.sigmas.float(), x, order=order)
    d = float((ours - ref).abs().max())
    record_parity(f"sampler UniPC order {order} vs diffusers UniPCMultistepScheduler", d)
    assert d <= TOL


def test_lcm_same_as_diffusers(record_parity):
    from diffusers import LCMScheduler

    sch = LCMScheduler(**SD_BETAS)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    ref = _run_diffusers(sch, 4, x, generator=torch.Generator().manual_seed(9))
    table = _table(sch)
    sigmas = torch.cat([table[sch.timesteps], torch.zeros(1)])
    ours = _run_ours(S.sample_lcm, sch, sigmas, x, boundary=True, noise_sampler=SeqNoise(x.shape, 9))
    d = float((ours - ref).abs().max())
    record_parity("sampler LCM vs diffusers LCMScheduler", d)
    assert d <= TOL


# --- analytic check: Gaussian data, whose exact denoiser is known -------------------------------------

MU, STD = 0.7, 0.5


def gaussian_denoiser(x, sigma, **extra):
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return MU + STD**2 / (STD**2 + s**2) * (x - MU)


DETERMINISTIC = ["euler", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "plms", "unipc"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_follow_the_exact_flow(name):
    """The probability-flow ODE maps x_T to MU + (x_T - MU) * STD / sqrt(STD^2 + sigma_max^2)."""
    fn = getattr(S, f"sample_{name}")
    x = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0)) * math.sqrt(STD**2 + 14.6**2) + MU
    exact = MU + (x - MU) * STD / math.sqrt(STD**2 + 14.6**2)
    errors = []
    for steps in (10, 40, 200):
        out = fn(gaussian_denoiser, x.clone(), schedules.get_sigmas_karras(steps, 0.02, 14.6), disable=True)
        errors.append(float((out - exact).abs().max()))
    # Converges as steps grow (high-order samplers reach float32 round-off by 40 steps, so 200 may not improve).
    assert errors[0] > errors[1] and (errors[1] > errors[2] or errors[2] < 3e-3), errors
    assert errors[2] < 0.02, errors
    assert abs(float(out.mean()) - float(exact.mean())) < 2e-3
    assert abs(float(out.std()) / float(exact.std()) - 1) < 0.015


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                                  "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm"])
def test_stochastic_samplers_reach_the_data_distribution(name):
    """Ancestral and SDE samplers do not follow one path, but their samples must have the data's statistics.

    (LCM is left out: it is exact only for consistency-distilled models.)
    """
    fn = getattr(S, f"sample_{name}")
    torch.manual_seed(0)
    x = torch.randn(1, 20000) * math.sqrt(STD**2 + 14.6**2) + MU  # one "image" of 20000 values
    out = fn(gaussian_denoiser, x, schedules.get_sigmas_karras(200, 0.02, 14.6), disable=True)
    assert abs(float(out.mean()) - MU) < 0.02
    assert abs(float(out.std()) - STD) < 0.02


def test_lcm_one_step_is_the_denoised_estimate():
    x = torch.randn(1, 100) * 14.6
    sigmas = torch.tensor([14.6, 0.0])
    assert torch.allclose(S.sample_lcm(gaussian_denoiser, x, sigmas, disable=True), gaussian_denoiser(x, sigmas[:1]))


def test_brownian_tree_is_consistent_and_normal():
    x = torch.zeros(2, 1000)
    a = S.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=5)
    b = S.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=5)
    n1 = a(10.0, 5.0)
    assert torch.equal(n1, b(10.0, 5.0))
    assert abs(float(n1.std()) - 1) < 0.1
    # increments over adjacent intervals add up: W(10)-W(2) = (W(10)-W(5)) + (W(5)-W(2))
    total = a(10.0, 2.0) * math.sqrt(8)
    parts = a(10.0, 5.0) * math.sqrt(5) + a(5.0, 2.0) * math.sqrt(3)
    assert torch.allclose(total, parts, atol=1e-5)
    assert not torch.equal(S.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=6)(10.0, 5.0), n1)


# --- names --------------------------------------------------------------------------------------

def test_names_users_know():
    assert S.resolve_sampler("Euler a")[0].function is S.sample_euler_ancestral
    info, sched = S.resolve_sampler("DPM++ 2M Karras")
    assert info.function is S.sample_dpmpp_2m and sched == "karras"
    assert S.resolve_sampler("DPM++ 2M", "Exponential")[1] == "Exponential"
    assert S.resolve_sampler("DPM++ 2M", "automatic")[1] == "karras"
    assert S.resolve_sampler("k_euler_a")[0].name == "Euler a"
    assert S.resolve_sampler("dpmpp_2m_sde_heun")[0].options == (("solver_type", "heun"),)
    with pytest.raises(ValueError, match="unknown sampler 'Eulr'; known samplers: DPM\\+\\+ 2M, "):
        S.resolve_sampler("Eulr")


def test_every_sampler_has_a_reachable_schedule():
    for info in S.SAMPLERS.values():
        assert schedules.get_sigmas(info.schedule, 5, schedules.sigmas_from_alphas_cumprod(schedules.alphas_cumprod())).shape == (6,)


# --- few-step samplers on a tiny random UNet, against diffusers' LCMScheduler and TCDScheduler -----------------


@pytest.fixture(scope="module")
def unets():
    """diffusers' tiny UNet and plainsd's with the same random weights, and a text context for both."""
    pytest.importorskip("diffusers")
    from tests.reference import unet_pair
    from tests.test_configs import test_config

    cfg = test_config("tiny").unet
    theirs, ours = unet_pair(cfg, seed=3)
    context = torch.randn(1, 8, cfg.context_dim, generator=torch.Generator().manual_seed(4))
    return theirs, ours, context


def _diffusers_loop(unet, scheduler, x, context, seed, timesteps=None, steps=None, **step_kw):
    scheduler.set_timesteps(steps, timesteps=timesteps)
    g, lat = torch.Generator().manual_seed(seed), x.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(lat, t, encoder_hidden_states=context).sample
            lat = scheduler.step(eps, t, lat, generator=g, **step_kw).prev_sample
    return scheduler.timesteps.tolist(), lat


def _plainsd_run(fn, denoiser, sigmas, x, context, seed, **kw):
    """The sampler from diffusers' starting latents (DDPM scaling at sigmas[0]), noise drawn as diffusers does."""
    out = fn(denoiser, x * (1 + sigmas[0] ** 2) ** 0.5, sigmas, extra_args={"cond": context}, disable=True,
             noise_sampler=SeqNoise(x.shape, seed), **kw)
    return out


def _unet_net(unet):
    return lambda x, t, cond: unet(x, t, cond)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_with_the_lcm_schedule_same_as_diffusers(unets, steps, record_parity):
    """LCM on diffusers' timestep selection (schedule "lcm"): same timesteps, boundary condition, re-noising."""
    from diffusers import LCMScheduler

    from plainsd.diffusion.denoisers import LCMDenoiser

    theirs, ours, context = unets
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    timesteps, ref = _diffusers_loop(theirs, LCMScheduler(**SD_BETAS), x, context, seed=7, steps=steps)
    den = LCMDenoiser(_unet_net(ours))
    sigmas = den.get_sigmas(steps, "lcm")
    assert den.sigma_to_t(sigmas[:-1]).tolist() == timesteps
    out = _plainsd_run(S.sample_lcm, den, sigmas, x, context, seed=7)
    d = float((out - ref).abs().max())
    record_parity(f"LCM {steps} steps, tiny UNet, vs diffusers LCMScheduler", d)
    assert d <= TOL * float(ref.abs().max())


def test_lcm_automatic_is_a1111s_schedule():
    """A1111's LCM ("Automatic"): n points from the top to the bottom of the 50 distillation timesteps, both ends
    included, log sigma interpolated between them, the UNet called at the nearest one; diffusers' LCMScheduler
    spreads n of them from the top without reaching the bottom. Hand-computed for 4 steps."""
    from plainsd.diffusion.denoisers import LCMDenoiser

    den = LCMDenoiser(None)
    full = schedules.sigmas_from_alphas_cumprod(schedules.alphas_cumprod())
    lcm_table = full[19::20]  # timesteps 19, 39, ..., 999
    assert torch.equal(den.sigmas, lcm_table)
    info, schedule = S.resolve_sampler("LCM")
    sigmas = den.get_sigmas(4, schedule)
    index = [49, 49 - 49 / 3, 49 / 3, 0]
    by_hand = [math.exp((1 - (i % 1)) * math.log(lcm_table[int(i)]) + (i % 1) * math.log(lcm_table[math.ceil(i)]))
               for i in index]
    assert torch.allclose(sigmas[:-1], torch.tensor(by_hand), rtol=1e-5) and sigmas[-1] == 0
    assert den.sigma_to_t(sigmas[:-1]).tolist() == [999, 679, 339, 19]
    assert den.sigma_to_t(den.get_sigmas(2, schedule)[:-1]).tolist() == [999, 19]
    assert den.sigma_to_t(den.get_sigmas(4, "lcm")[:-1]).tolist() == [999, 759, 499, 259]


def test_lcm_automatic_on_timesteps_diffusers_can_take(unets, record_parity):
    """At 2 steps A1111's timesteps (999, 19) lie on the table, so diffusers run with them as custom timesteps
    must give the same latents."""
    from diffusers import LCMScheduler

    from plainsd.diffusion.denoisers import LCMDenoiser

    theirs, ours, context = unets
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    den = LCMDenoiser(_unet_net(ours))
    sigmas = den.get_sigmas(2, S.resolve_sampler("LCM")[1])
    _, ref = _diffusers_loop(theirs, LCMScheduler(**SD_BETAS), x, context, seed=8, timesteps=[999, 19])
    out = _plainsd_run(S.sample_lcm, den, sigmas, x, context, seed=8)
    d = float((out - ref).abs().max())
    record_parity("LCM A1111 2 steps, tiny UNet, vs diffusers LCMScheduler(timesteps=[999, 19])", d)
    assert d <= TOL * float(ref.abs().max())


def test_lcm_step_off_the_table_by_hand(unets):
    """Between distillation timesteps (A1111's 4-step schedule), a step scales x by its own sigma, calls the UNet
    at the nearest distillation timestep and blends by the boundary condition at that timestep."""
    from plainsd.diffusion.denoisers import LCMDenoiser

    _, ours, context = unets
    den = LCMDenoiser(_unet_net(ours))
    sigma = den.get_sigmas(4, "normal")[1]  # index 32.67 of the table: UNet timestep 679
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12)) * float(sigma)
    with torch.no_grad():
        eps = ours(x / (1 + sigma**2) ** 0.5, torch.tensor([679.0]), context)
    t = 6790.0
    c_skip, c_out = 0.25 / (t**2 + 0.25), t / (t**2 + 0.25) ** 0.5
    by_hand = c_out * (x - sigma * eps) + c_skip * x / (1 + sigma**2) ** 0.5
    with torch.no_grad():
        got = den(x, sigma.reshape(1), cond=context)
    assert float((got - by_hand).abs().max()) <= TOL * float(by_hand.abs().max())
    with torch.no_grad():  # the UNet at the sigma's own (continuous) timestep draws something else
        continuous = DiscreteDenoiser(_unet_net(ours))(x, sigma.reshape(1), cond=context)
    assert float((got - continuous).abs().max()) > 100 * float((got - by_hand).abs().max())


@pytest.mark.parametrize("steps,eta", [(1, 0.3), (2, 0.3), (4, 0.3), (8, 0.3), (4, 0.0), (4, 1.0)])
def test_tcd_same_as_diffusers(unets, steps, eta, record_parity):
    """TCD on its default schedule (diffusers' TCDScheduler's timesteps) with gamma = eta."""
    from diffusers import TCDScheduler

    theirs, ours, context = unets
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(20 + steps))
    timesteps, ref = _diffusers_loop(theirs, TCDScheduler(**SD_BETAS), x, context, seed=9, steps=steps, eta=eta)
    info, schedule = S.resolve_sampler("TCD")
    den = DiscreteDenoiser(_unet_net(ours))
    sigmas = den.get_sigmas(steps, schedule)
    assert den.sigma_to_t(sigmas[:-1]).round().tolist() == timesteps
    out = _plainsd_run(info.function, den, sigmas, x, context, seed=9, eta=eta)
    d = float((out - ref).abs().max())
    record_parity(f"TCD {steps} steps eta={eta}, tiny UNet, vs diffusers TCDScheduler", d)
    assert d <= TOL * float(ref.abs().max())


def test_tcd_gamma_zero_is_euler_and_gamma_adds_noise():
    """gamma 0: each step is a DDIM jump that lands on the next sigma, i.e. an Euler step; the last one stops at
    timestep 0 (sigma_0) and comes back in the DDPM scaling. gamma > 0 changes the result; gamma > 1 is refused."""
    table = DiscreteDenoiser(None).sigmas
    x = torch.randn(2, 50, generator=torch.Generator().manual_seed(0)) * 14.6
    sigmas = schedules.get_sigmas_lcm(4, table)
    tcd = S.sample_tcd(gaussian_denoiser, x, sigmas, eta=0.0, disable=True)
    to_sigma_0 = torch.cat([sigmas[:-1], table[:1]])
    euler = S.sample_euler(gaussian_denoiser, x, to_sigma_0, disable=True) / (1 + table[0] ** 2) ** 0.5
    assert torch.allclose(tcd, euler, atol=1e-5)
    noisy = S.sample_tcd(gaussian_denoiser, x, sigmas, eta=0.3, disable=True, noise_sampler=PairNoise(x.shape))
    assert float((noisy - tcd).abs().max()) > 0.01
    with pytest.raises(ValueError, match="between 0 and 1"):
        S.sample_tcd(gaussian_denoiser, x, sigmas, eta=1.5, disable=True)
