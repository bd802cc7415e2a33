"""Denoisers: turn a noise-, velocity- or sample-predicting network into D(x, sigma) -> clean estimate.

Samplers only ever call model(x, sigma, **extra) and get the denoised latents back (Karras et al.
2022, k-diffusion's contract). Here x is in the "sigma" scaling: x = x0 + sigma * noise. The network
itself sees x / sqrt(sigma^2 + 1) (the DDPM scaling) and the continuous timestep of sigma.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import schedules


PREDICTIONS = ("eps", "v", "x0")  # what a network may predict: the noise, the velocity, the clean sample


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class DiscreteDenoiser:
    """D(x, sigma) for a network trained on SD's 1000 discrete timesteps.

    net(x_in, t, cond, **kw) returns eps (prediction="eps"), v (prediction="v") or the clean sample itself
    (prediction="x0", diffusers' "sample": SDXL-Lightning's 1-step model); denoised() turns it into the estimate.
    """

    def __init__(self, net: Callable, prediction: str = "eps", alphas_cumprod: torch.Tensor | None = None,
                 quantize: bool = False):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}")
        self.net = net
        self.prediction = prediction
        self.alphas_cumprod = schedules.alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        self.sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)  # low to high
        self.quantize = quantize

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return schedules.sigma_to_t(sigma, self.sigmas, self.quantize)

    def get_sigmas(self, n: int, schedule: str = "normal") -> torch.Tensor:
        return schedules.get_sigmas(schedule, n, self.sigmas)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        s = _bcast(sigma, x)
        c_in = 1 / (s**2 + 1) ** 0.5
        out = self.net(x * c_in, self.sigma_to_t(sigma.cpu()).to(x.device), **extra)
        return denoised(out, x, s, self.prediction)


def denoised(out: torch.Tensor, x: torch.Tensor, s: torch.Tensor, prediction: str) -> torch.Tensor:
    """The clean estimate a network's output gives at x (sigma scaling, s: sigma broadcast to x)."""
    if prediction == "eps":
        return x - s * out
    if prediction == "x0":  # the clean sample is the same in either scaling
        return out
    # v = alpha * eps - sigma_ddpm * x0 in DDPM scaling; solved for x0 in sigma scaling:
    return x / (s**2 + 1) - out * s / (s**2 + 1) ** 0.5


class LCMDenoiser(DiscreteDenoiser):
    """D(x, sigma) as A1111's LCM sampler (and ComfyUI's "lcm" model sampling) runs a network: on the timesteps
    latent consistency models were distilled on, with their boundary condition (Luo et al. 2023).

    Its sigma table holds the `original_steps` distillation timesteps k - 1, 2k - 1, ..., 999 (k = 1000 //
    original_steps), so schedules made from it span sigma(19) to sigma(999); the network is called at the
    distillation timestep nearest (in log sigma) to the sigma asked for, while x is scaled by that sigma itself,
    as A1111 does. The estimate is then c_out(t) D + c_skip(t) x_ddpm with t scaled by timestep_scaling, as
    diffusers' LCMScheduler (A1111 blends with x in the sigma scaling; c_skip is below 1e-5 on these timesteps,
    so the two differ by float round-off).
    """

    def __init__(self, net: Callable, prediction: str = "eps", alphas_cumprod: torch.Tensor | None = None,
                 original_steps: int = 50, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        full = schedules.alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        self.skip = len(full) // original_steps
        super().__init__(net, prediction, full[self.skip - 1::self.skip][:original_steps])
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        index = schedules.sigma_to_t(sigma, self.sigmas, quantize=True)
        return index * self.skip + (self.skip - 1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        c_skip, c_out = boundary_scalings(self.sigma_to_t(sigma.cpu()).to(x.device), self.sigma_data,
                                          self.timestep_scaling)
        s = _bcast(sigma, x)
        return _bcast(c_out, x) * super().__call__(x, sigma, **extra) + _bcast(c_skip, x) * x / (s**2 + 1) ** 0.5


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of latent consistency models at training timestep t: the identity as t -> 0."""
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.float(), c_out.float()


def lcm_boundary(denoiser: DiscreteDenoiser, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> Callable:
    """Latent consistency models' boundary condition (Luo et al. 2023): blend the estimate with the input.

    D'(x, sigma) = c_out(t) D(x, sigma) + c_skip(t) x_ddpm, with c_skip -> 1 as t -> 0.
    """

    def denoise(x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        t = denoiser.sigma_to_t(sigma.cpu()).round().to(x.device) * timestep_scaling
        c_skip = sigma_data**2 / (t**2 + sigma_data**2)
        c_out = t / (t**2 + sigma_data**2) ** 0.5
        s = _bcast(sigma.to(x.device), x)
        return _bcast(c_out, x) * denoiser(x, sigma, **extra) + _bcast(c_skip, x) * x / (s**2 + 1) ** 0.5

    return denoise


def training_loss(net: Callable, x0: torch.Tensor, cond, prediction: str = "eps",
                  alphas_cumprod: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None, snr_gamma: float | None = None,
                  rows: slice | None = None) -> torch.Tensor:
    """DDPM's simple loss (Ho et al. 2020): noise x0 at a random timestep, regress eps (or v, or x0) with MSE.

    weights (broadcastable to (B, 1, H, W)): a weighted mean over the latent pixels instead of the plain mean.
    snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023): each sample's loss times min(SNR, gamma) / SNR for
    eps (min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0), SNR = alpha_bar / (1 - alpha_bar); it takes
    weight off the nearly clean timesteps, whose gradients conflict with the noisy ones. 5 is the paper's value.
    rows: the network runs on these rows of the batch only (one process's share in data-parallel training);
    timesteps and noise are still drawn for the whole batch and weights normalised over it, so that the mean
    of the processes' losses is the whole batch's loss, whatever the split.
    cond: what net takes beside xt and the timesteps, a tensor or a dict of tensors (SDXL's), one row per sample."""
    ac = (schedules.alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).to(x0.device)
    if timesteps is None:
        timesteps = schedules.sample_timesteps(x0.shape[0], generator, train_steps=len(ac)).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    weight_sum = None  # what the weighted squares are divided by: the weights' sum, or the rows' part of the batch's
    if rows is not None:
        if weights is not None:
            weights = weights.float().expand(x0.shape[0], 1, *x0.shape[2:])
            weight_sum = weights.sum() * len(range(x0.shape[0])[rows]) / x0.shape[0]
            weights = weights[rows]
        x0, noise, timesteps = x0[rows], noise[rows], timesteps[rows]
        cond = {k: v[rows] for k, v in cond.items()} if isinstance(cond, dict) else cond[rows]
    xt = schedules.add_noise(x0, noise, timesteps, ac)
    a = _bcast(ac[timesteps], x0)
    target = {"eps": noise, "x0": x0}.get(prediction, a.sqrt() * noise - (1 - a).sqrt() * x0)
    pred = net(xt, timesteps, cond).float()
    if weights is None and snr_gamma is None:
        return F.mse_loss(pred, target.float())
    squared = (pred - target.float()) ** 2
    if snr_gamma is not None:  # per-sample weights on the timesteps
        snr = (ac[timesteps] / (1 - ac[timesteps])).float()
        per = {"eps": snr, "x0": torch.ones_like(snr)}.get(prediction, snr + 1)  # (Min-SNR's weight per target)
        squared = squared * _bcast(snr.clamp(max=snr_gamma) / per, squared)
    if weights is None:
        return squared.mean()
    weights = weights.float().expand(x0.shape[0], 1, *x0.shape[2:])
    return (squared * weights).sum() / ((weights.sum() if weight_sum is None else weight_sum) * x0.shape[1])
