"""Noise schedules as pure functions.

Two views of the same process (Karras et al. 2022, appendix): the discrete DDPM view with
alphas_cumprod over 1000 training timesteps, and the continuous "sigma" view in which a noisy latent
is x = x0 + sigma * noise (x divided by sqrt(alpha_cumprod)). sigma(t) = sqrt((1 - a_t) / a_t).
"""

from __future__ import annotations

import math

import torch

TRAIN_STEPS = 1000


def betas_scaled_linear(n: int = TRAIN_STEPS, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's betas: linear in sqrt(beta), then squared."""
    return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2


def alphas_cumprod(betas: torch.Tensor | None = None) -> torch.Tensor:
    """Product of (1 - beta) up to each timestep, as float32 (as SD's reference code stores it)."""
    betas = betas_scaled_linear() if betas is None else betas
    return torch.cumprod(1.0 - betas, dim=0).float()


def sigmas_from_alphas_cumprod(ac: torch.Tensor) -> torch.Tensor:
    return ((1 - ac) / ac) ** 0.5


def sigma_to_alpha_cumprod(sigma: torch.Tensor | float) -> torch.Tensor:
    return 1.0 / (1.0 + torch.as_tensor(sigma) ** 2)


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor, quantize: bool = False) -> torch.Tensor:
    """Continuous timestep of a sigma: linear interpolation of log sigma between the table's entries."""
    sigma = torch.as_tensor(sigma, dtype=sigmas.dtype)
    log_sigma = sigma.log()
    log_sigmas = sigmas.log()
    dists = log_sigma.reshape(-1) - log_sigmas[:, None]  # [table, n]
    if quantize:
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigmas.dtype)
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(sigmas) - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * high).view(sigma.shape).to(sigmas.dtype)


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma of a continuous timestep: linear interpolation of log sigma."""
    t = torch.as_tensor(t, dtype=sigmas.dtype)
    low, high = t.floor().long(), t.ceil().long()
    w = t.frac()
    log_sigmas = sigmas.log()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def sample_timesteps(n: int, generator: torch.Generator | None = None, kind: str = "uniform",
                     train_steps: int = TRAIN_STEPS) -> torch.Tensor:
    """n training timesteps: "uniform" over [0, train_steps), as DDPM draws them, or "cubic", t = (1 - u^3) T,
    the T2I-Adapter recipe's draw, which favours the noisy timesteps where the layout of a picture is decided."""
    if kind == "uniform":
        return torch.randint(0, train_steps, (n,), generator=generator)
    if kind == "cubic":
        u = torch.rand(n, generator=generator)
        return ((1 - u**3) * train_steps).long().clamp(0, train_steps - 1)
    raise ValueError(f"timestep sampling is 'uniform' or 'cubic', not {kind!r}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x_0) = N(sqrt(a_t) x0, (1 - a_t) I), sampled with the given noise."""
    a = ac.to(x0.device)[timesteps].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# --- sigma schedules: each returns n sigmas, high to low, then a final 0 ---------------------------

def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros([1])])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: uniform steps in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform steps in log sigma."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """log sigma follows a polynomial ramp of degree rho (rho = 1 is exponential)."""
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def get_sigmas_normal(n: int, sigmas: torch.Tensor) -> torch.Tensor:
    """Uniform in continuous timestep from the last training step to 0 (k-diffusion's get_sigmas)."""
    t = torch.linspace(len(sigmas) - 1, 0, n, dtype=sigmas.dtype)
    return _append_zero(t_to_sigma(t, sigmas)).float()


def get_sigmas_sgm_uniform(n: int, sigmas: torch.Tensor) -> torch.Tensor:
    """Uniform in timestep between sigma_max and sigma_min, leaving out the end point (as SGM does)."""
    start, end = sigma_to_t(sigmas[-1], sigmas), sigma_to_t(sigmas[0], sigmas)
    t = torch.linspace(float(start), float(end), n + 1)[:-1]
    return _append_zero(t_to_sigma(t, sigmas)).float()


def get_sigmas_simple(n: int, sigmas: torch.Tensor) -> torch.Tensor:
    """Every (1000 / n)-th training sigma from the top (ComfyUI's "simple")."""
    stride = len(sigmas) / n
    return _append_zero(torch.stack([sigmas[-(1 + int(i * stride))] for i in range(n)])).float()


def get_sigmas_ddim_uniform(n: int, sigmas: torch.Tensor) -> torch.Tensor:
    """Training sigmas at a fixed integer stride, as DDIM's uniform discretisation."""
    stride = max(len(sigmas) // n, 1)
    picked = [sigmas[i] for i in range(1, len(sigmas), stride)][::-1]
    return _append_zero(torch.stack(picked)).float()


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in arctan(sigma) (Sabour et al. 2024, "Align Your Steps")."""
    t = torch.linspace(0, 1, n)
    return _append_zero(torch.tan((1 - t) * math.atan(sigma_max) + t * math.atan(sigma_min)))


def get_sigmas_lcm(n: int, sigmas: torch.Tensor, original_steps: int = 50) -> torch.Tensor:
    """diffusers' LCMScheduler and TCDScheduler timesteps: of the `original_steps` timesteps the model was distilled
    on (k - 1, 2k - 1, ..., 999 with k = 1000 // original_steps), n picked at evenly spaced indices from the top
    (floor of linspace(0, original_steps, n, endpoint=False)). A table of exactly original_steps sigmas (the LCM
    denoiser's) is taken as those timesteps themselves."""
    k = len(sigmas) // original_steps
    if not 1 <= n <= original_steps or k < 1:
        raise ValueError(f"the lcm schedule has 1 to {original_steps} steps (the timesteps the model was distilled "
                         f"on), got {n}")
    origin = sigmas[k - 1::k][:original_steps].flip(0)  # high to low
    picked = torch.floor(torch.arange(n, dtype=torch.float64) * original_steps / n).long()
    return _append_zero(origin[picked]).float()


def timesteps_spaced(n: int, spacing: str, train_steps: int = TRAIN_STEPS, offset: int = 1) -> torch.Tensor:
    """Discrete timesteps, high to low, with diffusers' spacings: leading (+offset, SD's), trailing, linspace."""
    if spacing == "leading":
        ratio = train_steps // n
        t = torch.arange(0, n) * ratio + offset
    elif spacing == "trailing":
        t = torch.round(torch.arange(train_steps, 0, -train_steps / n)).long() - 1
        return t.clamp(0, train_steps - 1)
    elif spacing == "linspace":
        t = torch.linspace(0, train_steps - 1, n).round().long()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; known: leading, trailing, linspace")
    return t.flip(0).clamp(0, train_steps - 1)


def get_sigmas_spaced(n: int, sigmas: torch.Tensor, spacing: str) -> torch.Tensor:
    return _append_zero(sigmas[timesteps_spaced(n, spacing, len(sigmas))]).float()


SCHEDULES = ("automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "simple", "normal",
             "ddim", "kl_optimal", "leading", "trailing", "linspace", "lcm")
# The names A1111 shows in its "Schedule type" menu, and what they mean here.
SCHEDULE_LABELS = {"Automatic": "automatic", "Uniform": "uniform", "Karras": "karras", "Exponential": "exponential",
                   "Polyexponential": "polyexponential", "SGM Uniform": "sgm_uniform", "Simple": "simple",
                   "Normal": "normal", "DDIM": "ddim", "KL Optimal": "kl_optimal", "Leading": "leading",
                   "Trailing": "trailing", "Linspace": "linspace", "LCM": "lcm"}


def schedule_key(schedule: str) -> str:
    """A schedule as users write it (a key of SCHEDULES or a label of SCHEDULE_LABELS) -> its key."""
    key = SCHEDULE_LABELS.get(schedule, schedule.lower().replace(" ", "_") if isinstance(schedule, str) else schedule)
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known schedules: {', '.join(SCHEDULES)}")
    return key


def schedule_label(schedule: str) -> str:
    """The label A1111 shows for a schedule key ("karras" -> "Karras"); any other name as it is."""
    return {key: label for label, key in SCHEDULE_LABELS.items()}.get(schedule, schedule)


def get_sigmas(schedule: str, n: int, sigmas: torch.Tensor) -> torch.Tensor:
    """n steps of a named schedule for a model whose training sigmas are `sigmas` (low to high)."""
    key = schedule_key(schedule)
    if n < 1:
        raise ValueError(f"steps must be at least 1, got {n}")
    lo, hi = float(sigmas[0]), float(sigmas[-1])
    if key in ("automatic", "uniform", "normal"):
        return get_sigmas_normal(n, sigmas)
    if key == "karras":
        return get_sigmas_karras(n, lo, hi)
    if key == "exponential":
        return get_sigmas_exponential(n, lo, hi)
    if key == "polyexponential":
        return get_sigmas_polyexponential(n, lo, hi)
    if key == "sgm_uniform":
        return get_sigmas_sgm_uniform(n, sigmas)
    if key == "simple":
        return get_sigmas_simple(n, sigmas)
    if key == "ddim":
        return get_sigmas_ddim_uniform(n, sigmas)
    if key == "kl_optimal":
        return get_sigmas_kl_optimal(n, lo, hi)
    if key == "lcm":
        return get_sigmas_lcm(n, sigmas)
    return get_sigmas_spaced(n, sigmas, key)
