"""Samplers as plain functions, with k-diffusion's contract.

    sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)

`model(x, sigma, **extra_args)` returns the denoised estimate of x (see denoisers.py); `x` starts as
noise of standard deviation sigmas[0]; `sigmas` run from high to low and usually end with 0. The
callback gets {x, i, sigma, sigma_hat, denoised} once per step. Samplers never see timesteps, betas or
text. Stochastic samplers take `noise_sampler(sigma, sigma_next) -> standard normal noise like x`.

SAMPLERS maps the names users know (A1111's) to a function and its default schedule.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import trange

from . import schedules
from .noise import randn

# --- helpers --------------------------------------------------------------------------------------


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma (Karras et al. 2022, eq. 3 with sigma(t) = t)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split a step into a deterministic part down to sigma_down and fresh noise of size sigma_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _seed_generators(seeds, device) -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


class NoiseSampler:
    """Fresh standard normal noise at each call, one generator per image so that seeds are per image."""

    def __init__(self, x: torch.Tensor, seeds: list[int] | None = None):
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.generators = _seed_generators(seeds, "cpu") if seeds is not None else None

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        if self.generators is None:
            return torch.randn(self.shape, dtype=self.dtype, device=self.device)
        return torch.stack([randn(g, self.shape[1:]) for g in self.generators]).to(self.device, self.dtype)


def default_noise_sampler(x: torch.Tensor) -> NoiseSampler:
    return NoiseSampler(x)


class BrownianTreeNoiseSampler:
    """Noise from one fixed Brownian motion W(sigma) per image, queried at any pair of sigmas.

    SDE samplers ask for increments over overlapping intervals; drawing them from one path keeps them
    consistent (Kidger et al. 2021's Brownian tree). W is built by seeded bisection of [sigma_min,
    sigma_max]: each midpoint is a Brownian-bridge draw whose seed depends only on its place in the tree,
    so the same seed gives the same path whatever the query order.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed: int | list[int] | None = None, depth: int = 24):
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        seeds = seed if isinstance(seed, (list, tuple)) else [
            (torch.randint(0, 2**62, []).item() if seed is None else seed) + i for i in range(x.shape[0])]
        if len(seeds) != x.shape[0]:
            raise ValueError("BrownianTreeNoiseSampler needs one seed per image")
        self.seeds = [int(s) for s in seeds]
        self.lo, self.hi = float(sigma_min), float(sigma_max)
        self.depth = depth
        self.cache: dict[float, torch.Tensor] = {}

    def _normal(self, node: int) -> torch.Tensor:
        out = []
        for s in self.seeds:
            h = hashlib.blake2b(f"{s}:{node}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(h, "little") >> 1)
            out.append(torch.randn(self.shape[1:], generator=g, dtype=torch.float64))
        return torch.stack(out)

    def _w(self, t: float) -> torch.Tensor:
        t = min(max(t, self.lo), self.hi)
        if t in self.cache:
            return self.cache[t]
        a, b = self.lo, self.hi
        wa, wb = torch.zeros(self.shape, dtype=torch.float64), self._normal(1) * math.sqrt(b - a)
        node = 1
        for _ in range(self.depth):
            if t == a or t == b:
                break
            m = (a + b) / 2
            wm = (wa + wb) / 2 + self._normal(2 * node) * math.sqrt(b - a) / 2
            if t < m:
                b, wb, node = m, wm, 2 * node
            else:
                a, wa, node = m, wm, 2 * node + 1
        w = wa if t == a else wb if t == b else wa + (wb - wa) * (t - a) / (b - a)
        if len(self.cache) > 256:
            self.cache.clear()
        self.cache[t] = w
        return w

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0, t1 = float(sigma), float(sigma_next)
        w = (self._w(t1) - self._w(t0)) / math.sqrt(abs(t1 - t0))
        return (w if t1 > t0 else -w).to(self.device, self.dtype)


def _setup(x, extra_args):
    return ({} if extra_args is None else extra_args), x.new_ones([x.shape[0]])


def _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler):
    """Karras et al.'s optional "churn": raise the noise level by a factor (1 + gamma) before the step, for
    sigmas in [s_tmin, s_tmax]. With churn on, a noise is drawn at every step, used or not, as k-diffusion does:
    step i gets the same noise from the same generator as there."""
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    sigma_hat = sigmas[i] * (gamma + 1)
    if s_churn > 0:
        noise = (noise_sampler or default_noise_sampler(x))(sigmas[i], sigma_hat)
        if gamma > 0:
            x = x + noise * s_noise * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def _report(callback, x, i, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


# --- Karras et al. (2022) and k-diffusion's samplers -------------------------------------------------


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, noise_sampler=None):
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2, first-order)."""
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """Euler steps down to sigma_down, then fresh noise up to the next sigma ("Euler a")."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0, noise_sampler=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 2); Euler for the last step to 0."""
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, noise_sampler=None):
    """Midpoint steps in log sigma, after DPM-Solver-2 (Lu et al. 2022) and Karras et al. (2022)."""
    extra_args, s_in = _setup(x, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """DPM2 steps down to sigma_down, then fresh noise ("DPM2 a")."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(torch.as_tensor(sigma_down).log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def lms_coefficient(order: int, t, i: int, j: int) -> float:
    """Integral over [t_i, t_i+1] of the Lagrange basis polynomial through t_i, ..., t_i-order+1 at t_i-j.

    The integrand is a polynomial, so it is integrated exactly.
    """
    if order - 1 > i:
        raise ValueError(f"order {order} is too high for step {i}")
    coeffs = [1.0]  # polynomial in tau, lowest degree first
    for k in range(order):
        if k == j:
            continue
        denom = float(t[i - j] - t[i - k])
        # multiply by (tau - t[i-k]) / denom
        shifted = [0.0] + coeffs
        scaled = [c * -float(t[i - k]) for c in coeffs] + [0.0]
        coeffs = [(a + b) / denom for a, b in zip(shifted, scaled)]
    a, b = float(t[i]), float(t[i + 1])
    return sum(c * (b ** (n + 1) - a ** (n + 1)) / (n + 1) for n, c in enumerate(coeffs))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep (Adams-Bashforth with variable steps) on the ODE derivative."""
    extra_args, s_in = _setup(x, extra_args)
    ts = sigmas.detach().cpu().double().tolist()
    ds = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds.append(to_d(x, sigmas[i], denoised))
        ds = ds[-order:]
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, ts, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def _t(sigma):  # DPM-Solver's time variable: t = -log sigma (the half log-SNR)
    return sigma.log().neg()


def _sigma(t):
    return t.neg().exp()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None):
    """DPM-Solver++(2S) single-step second order (Lu et al. 2022b), with ancestral noise."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(torch.as_tensor(sigma_down))
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma(s) * s_in, **extra_args)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _brownian(x, sigmas, noise_sampler):
    if noise_sampler is not None:
        return noise_sampler
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max())


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2):
    """DPM-Solver++ stochastic, two model calls per step (as k-diffusion's DPM++ SDE)."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = _brownian(x, sigmas, noise_sampler)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # first stage: to the intermediate time s
        sd, su = get_ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = _t(torch.as_tensor(sd))
        x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(_sigma(t), _sigma(s)) * s_noise * su
        denoised_2 = model(x_2, _sigma(s) * s_in, **extra_args)
        # second stage: the whole step with the blended estimate
        sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = _t(torch.as_tensor(sd))
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise_sampler(_sigma(t), _sigma(t_next)) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M): second-order multistep in the data prediction (Lu et al. 2022b)."""
    extra_args, s_in = _setup(x, extra_args)
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is not None and sigmas[i + 1] != 0:
            r = (t - _t(sigmas[i - 1])) / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        else:
            estimate = denoised
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * estimate
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = _brownian(x, sigmas, noise_sampler)
    old_denoised, h_last, h = None, None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE: third-order multistep."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = _brownian(x, sigmas, noise_sampler)
    denoised_1 = denoised_2 = None
    h, h_1, h_2 = None, None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# --- DPM-Solver with fixed and adaptive steps (Lu et al. 2022) -------------------------------------


class _DPMSolver:
    """DPM-Solver-1/2/3 single steps in t = -log sigma, on the noise prediction eps = (x - D) / sigma."""

    def __init__(self, model, extra_args, on_eval=None):
        self.model, self.extra_args, self.on_eval = model, extra_args, on_eval

    def eps(self, cache, key, x, t):
        if key not in cache:
            sigma = _sigma(t)
            cache[key] = (x - self.model(x, sigma * x.new_ones([x.shape[0]]), **self.extra_args)) / sigma
            if self.on_eval:
                self.on_eval()
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        return x - _sigma(t_next) * (t_next - t).expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - _sigma(s2) * (r2 * h).expm1() * eps
              - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None):
    """DPM-Solver-Fast: n model calls in steps of order 3 (then 2, 1), uniform in t (Lu et al. 2022)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must be above 0 for DPM fast")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = noise_sampler or default_noise_sampler(x)
    t_start, t_end = _t(torch.tensor(float(sigma_max))), _t(torch.tensor(float(sigma_min)))
    m = n // 3 + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    solver = _DPMSolver(model, extra_args)
    for i in trange(len(orders), disable=disable):
        cache = {}
        t, t_next = ts[i], ts[i + 1]
        if eta:
            sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = torch.minimum(t_end, _t(sd))
            su = (_sigma(t_next) ** 2 - _sigma(t_next_) ** 2) ** 0.5
        else:
            t_next_, su = t_next, 0.0
        eps = solver.eps(cache, "eps", x, t)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "t_up": t, "sigma": _sigma(t), "sigma_hat": _sigma(t), "denoised": x - _sigma(t) * eps})
        step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}[orders[i]]
        x = step(x, t, t_next_, cache)
        x = x + su * s_noise * noise_sampler(_sigma(t), _sigma(t_next))
    return x


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                        eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False):
    """DPM-Solver-12 / -23 with adaptive step size: an embedded pair estimates the error (Lu et al. 2022)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must be above 0 for DPM adaptive")
    if order not in (2, 3):
        raise ValueError("order must be 2 or 3")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = noise_sampler or default_noise_sampler(x)
    t_start, t_end = _t(torch.tensor(float(sigma_max))), _t(torch.tensor(float(sigma_min)))
    solver = _DPMSolver(model, extra_args)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    pid = _PID(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    s, x_prev = t_start, x
    while s < t_end - 1e-5:
        cache = {}
        t = torch.minimum(t_end, s + pid.h)
        if eta:
            sd, su = get_ancestral_step(_sigma(s), _sigma(t), eta)
            t_ = torch.minimum(t_end, _t(sd))
            su = (_sigma(t) ** 2 - _sigma(t_) ** 2) ** 0.5
        else:
            t_, su = t, 0.0
        eps = solver.eps(cache, "eps", x, s)
        denoised = x - _sigma(s) * eps
        if order == 2:
            x_low, x_high = solver.step_1(x, s, t_, cache), solver.step_2(x, s, t_, cache)
        else:
            x_low, x_high = solver.step_2(x, s, t_, cache, r1=1 / 3), solver.step_3(x, s, t_, cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + su * s_noise * noise_sampler(_sigma(s), _sigma(t))
            s = t
            info["n_accept"] += 1
        else:
            info["n_reject"] += 1
        info["nfe"] += order
        info["steps"] += 1
        if callback is not None:
            callback({"x": x, "i": info["steps"] - 1, "t": s, "t_up": s, "sigma": _sigma(s), "sigma_hat": _sigma(s),
                      "denoised": denoised, "error": error, "h": pid.h, **info})
    return (x, info) if return_info else x


class _PID:
    """PID step-size control for the adaptive solver (Söderlind 2003's limiter)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[float] = []

    def propose_step(self, error) -> bool:
        inv = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


# --- samplers from the DDPM family, in the same sigma formulation ----------------------------------


def _alpha(sigma):  # alpha_cumprod of a sigma
    return 1 / (1 + sigma**2)


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, noise_sampler=None):
    """DDIM (Song et al. 2021): eta = 0 is deterministic (and equals Euler here); eta = 1 is DDPM-like."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        eps = to_d(x, sigmas[i], denoised)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])  # scalar maths in float64
        a, a_next = _alpha(sigma), _alpha(sigma_next)
        std = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)) ** 0.5
        x = denoised + (max(1 - a_next - std**2, 0.0) / a_next) ** 0.5 * eps
        if eta:
            x = x + std / a_next**0.5 * noise_sampler(sigma, sigma_next)
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) (Ho et al. 2020), "fixed small" variance."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])  # scalar maths in float64
        a, a_prev = _alpha(sigma), _alpha(sigma_next)
        alpha_t, beta_t = a / a_prev, 1 - a / a_prev
        mean = (a_prev**0.5 * beta_t / (1 - a)) * denoised + (alpha_t**0.5 * (1 - a_prev) / (1 - a)) * (x * a**0.5)
        if sigma_next > 0:
            var = max((1 - a_prev) / (1 - a) * beta_t, 1e-20)
            mean = mean + var**0.5 * noise_sampler(sigma, sigma_next)
        x = mean / a_prev**0.5
    return x


@torch.no_grad()
def sample_plms(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """PLMS / PNDM (Liu et al. 2022): 4th-order Adams-Bashforth on eps with fixed coefficients,
    started by one Heun-like step; each step transfers x as DDIM does."""
    extra_args, s_in = _setup(x, extra_args)
    old_eps: list[torch.Tensor] = []
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, x, i, sigma, sigma, denoised)
        eps = to_d(x, sigma, denoised)
        if not old_eps:
            if sigma_next > 0:
                x_2 = x + (sigma_next - sigma) * eps
                eps_prime = (eps + to_d(x_2, sigma_next, model(x_2, sigma_next * s_in, **extra_args))) / 2
            else:
                eps_prime = eps
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + (sigma_next - sigma) * eps_prime
        old_eps = (old_eps + [eps])[-3:]
    return x


@torch.no_grad()
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None, order=2, variant="bh2",
                 lower_order_final=True):
    """UniPC (Zhao et al. 2023): multistep predictor UniP with corrector UniC, on the data prediction.

    In the sigma scaling the update needs only lambda = -log sigma; B(h) is "bh1" (h) or "bh2" (e^h - 1).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError("variant must be 'bh1' or 'bh2'")
    extra_args, s_in = _setup(x, extra_args)
    n = len(sigmas) - 1
    lambdas = _t(sigmas.float())  # -log sigma; +inf for a final sigma of 0
    outputs: list[torch.Tensor] = []  # data predictions, newest last
    last_x, last_order = None, 0

    def update(x_s, i_s, i_t, m0, history, r_history, corrector_term=None):
        h = lambdas[i_t] - lambdas[i_s]
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        k = len(history) + 1  # the order of this update
        rks, d1s = [], []
        for m_i, lam_i in zip(history, r_history):
            rk = (lam_i - lambdas[i_s]) / h
            rks.append(rk)
            d1s.append((m_i - m0) / rk)
        rks.append(torch.ones(()))
        rks = torch.stack(rks)
        factorial, h_phi_k = 1, h_phi_1 / hh - 1
        big_r, b = [], []
        for j in range(1, k + 1):
            big_r.append(rks**(j - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        x_t = sigmas[i_t] / sigmas[i_s] * x_s - h_phi_1 * m0 if sigmas[i_t] > 0 else -h_phi_1 * m0
        if corrector_term is None:  # predictor
            if d1s:
                rhos = torch.tensor([0.5]) if k == 2 else torch.linalg.solve(torch.stack(big_r)[:-1, :-1], torch.stack(b)[:-1])
                x_t = x_t - b_h * sum(r * d for r, d in zip(rhos, d1s))
            return x_t
        rhos = torch.tensor([0.5]) if k == 1 else torch.linalg.solve(torch.stack(big_r), torch.stack(b))
        corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
        return x_t - b_h * (corr + rhos[-1] * (corrector_term - m0))

    for i in trange(n, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if last_x is not None:  # UniC: correct the previous step with the new model output
            hist = outputs[-last_order:-1][::-1] if last_order > 1 else []
            lam_hist = [lambdas[i - 1 - j] for j in range(1, last_order)]
            x = update(last_x, i - 1, i, outputs[-1], hist, lam_hist, corrector_term=denoised)
        outputs = (outputs + [denoised])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, len(outputs))
        last_x, last_order = x, this_order
        hist = outputs[-this_order:-1][::-1] if this_order > 1 else []
        lam_hist = [lambdas[i - j] for j in range(1, this_order)]
        x = update(x, i, i + 1, denoised, hist, lam_hist)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Latent consistency sampling (Luo et al. 2023): jump to the clean estimate, re-noise to the next sigma.
    The distillation timesteps and the boundary condition are the denoiser's (denoisers.LCMDenoiser), as in A1111."""
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, eta=0.3,
               training_sigmas=None):
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024), as diffusers'
    TCDScheduler: from the clean estimate, a DDIM jump down to timestep s = floor((1 - eta) * t_next) and fresh
    noise back up to sigma_next. eta is the paper's gamma: 0 is deterministic (each step lands on sigma_next),
    1 is LCM's step (all the way to the estimate, then all noise). The timesteps are the training table's
    (training_sigmas, low to high; SD's by default), the one thing about the model this sampler must know.
    The last step ends at timestep 0 and returns that sample in the DDPM scaling, as diffusers does."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"TCD's eta (its gamma) must be between 0 and 1, got {eta}")
    extra_args, s_in = _setup(x, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x)
    table = _training_sigmas() if training_sigmas is None else training_sigmas
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        t_next = int(schedules.sigma_to_t(sigmas[i + 1], table, quantize=True)) if sigmas[i + 1] > 0 else 0
        sigma_s = table[math.floor((1 - eta) * t_next)].to(x.dtype)
        x = denoised + to_d(x, sigmas[i], denoised) * sigma_s
        if sigmas[i + 1] == 0:
            x = x / (1 + sigma_s**2) ** 0.5
        elif eta > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * (sigmas[i + 1] ** 2 - sigma_s**2).clamp(min=0) ** 0.5
    return x


def _training_sigmas() -> torch.Tensor:
    return schedules.sigmas_from_alphas_cumprod(schedules.alphas_cumprod())


# --- the names users know -------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerInfo:
    name: str                # A1111's label
    function: Callable
    schedule: str            # what "automatic" means for it
    aliases: tuple = ()
    stochastic: bool = False  # takes a noise_sampler
    options: tuple = ()      # extra keyword arguments fixed by the name (e.g. eta)
    discard_penultimate: bool = False   # A1111's discard_next_to_last_sigma (schedule_sigmas)


def _info(name, fn, schedule="normal", aliases=(), stochastic=False, discard=False, **options):
    return SamplerInfo(name, fn, schedule, aliases, stochastic, tuple(options.items()), discard)


def schedule_sigmas(denoiser, info: SamplerInfo, steps: int, schedule: str) -> torch.Tensor:
    """A sampler's schedule of `steps` steps as A1111 makes it (KDiffusionSampler.get_sigmas): for the samplers
    that discard the next-to-last sigma (DPM2, DPM2 a, DPM++ 3M SDE), one step more with that sigma left out, so
    that their last step goes down to 0 from a higher noise level."""
    if not info.discard_penultimate:
        return denoiser.get_sigmas(steps, schedule)
    sigmas = denoiser.get_sigmas(steps + 1, schedule)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


SAMPLERS: dict[str, SamplerInfo] = {s.name: s for s in [
    _info("DPM++ 2M", sample_dpmpp_2m, "karras", ("k_dpmpp_2m", "dpmpp_2m")),
    _info("DPM++ SDE", sample_dpmpp_sde, "karras", ("k_dpmpp_sde", "dpmpp_sde"), True),
    _info("DPM++ 2M SDE", sample_dpmpp_2m_sde, "exponential", ("k_dpmpp_2m_sde", "dpmpp_2m_sde"), True),
    _info("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde, "exponential", ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun"), True,
          solver_type="heun"),
    _info("DPM++ 2S a", sample_dpmpp_2s_ancestral, "karras", ("k_dpmpp_2s_a", "dpmpp_2s_ancestral"), True),
    _info("DPM++ 3M SDE", sample_dpmpp_3m_sde, "exponential", ("k_dpmpp_3m_sde", "dpmpp_3m_sde"), True, discard=True),
    _info("Euler a", sample_euler_ancestral, "normal", ("k_euler_a", "k_euler_ancestral", "euler_ancestral"), True),
    _info("Euler", sample_euler, "normal", ("k_euler", "euler")),
    _info("LMS", sample_lms, "normal", ("k_lms", "lms")),
    _info("Heun", sample_heun, "normal", ("k_heun", "heun")),
    _info("DPM2", sample_dpm_2, "karras", ("k_dpm_2", "dpm_2"), discard=True),
    _info("DPM2 a", sample_dpm_2_ancestral, "karras", ("k_dpm_2_a", "dpm_2_ancestral"), True, discard=True),
    _info("DPM fast", sample_dpm_fast, "normal", ("k_dpm_fast", "dpm_fast"), True),
    _info("DPM adaptive", sample_dpm_adaptive, "normal", ("k_dpm_ad", "dpm_adaptive"), True),
    _info("DDIM", sample_ddim, "ddim", ("ddim",), True),
    _info("DDPM", sample_ddpm, "leading", ("ddpm",), True),
    _info("PLMS", sample_plms, "ddim", ("plms", "pndm")),
    _info("UniPC", sample_unipc, "normal", ("unipc",)),
    _info("LCM", sample_lcm, "normal", ("k_lcm", "lcm"), True),
    _info("TCD", sample_tcd, "lcm", ("tcd",), True),
]}

# Older A1111 names carry the schedule: "DPM++ 2M Karras", "Euler a Exponential", ...
SCHEDULE_SUFFIXES = {" Karras": "karras", " Exponential": "exponential", " Polyexponential": "polyexponential",
                     " SGM Uniform": "sgm_uniform", " Uniform": "uniform", " Simple": "simple", " Normal": "normal",
                     " Beta": "beta"}


def takes(info: SamplerInfo, setting: str) -> bool:
    """Whether the sampler's function has this keyword (eta, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)."""
    return setting in inspect.signature(info.function).parameters


def default_eta(info: SamplerInfo) -> float:
    """The eta a sampler with one runs at when none is given: A1111's settings eta_ddim (0) for DDIM and
    eta_ancestral (1) for k-diffusion's samplers, DPM fast and adaptive included (their functions' own is 0);
    TCD's gamma, 0.3 (the paper's and diffusers' default)."""
    if info.function is sample_tcd:
        return 0.3
    return 0.0 if info.function is sample_ddim else 1.0


def resolve_sampler(name: str, schedule: str | None = None) -> tuple[SamplerInfo, str]:
    """A sampler name as users type it (+ optional schedule) -> (sampler, schedule name)."""
    info = _split(name)[0]
    return info, chosen_schedule(name, schedule) or info.schedule


def chosen_schedule(name: str, schedule: str | None = None) -> str | None:
    """The schedule a user chose: given on its own, else in an older sampler name ("DPM++ 2M Karras"); None for
    "automatic" (each sampler's own). A1111's hires fix hands this one on to a second pass's sampler."""
    if schedule not in (None, "", "automatic", "Automatic"):
        return schedule
    return _split(name)[1]


def _split(name: str) -> tuple[SamplerInfo, str | None]:
    """(the sampler, the schedule its name carries or None)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"sampler must be a name; known samplers: {', '.join(SAMPLERS)}")
    text = name.strip()
    lookup = {k.lower(): v for k, v in SAMPLERS.items()}
    for info in SAMPLERS.values():
        for alias in info.aliases:
            lookup.setdefault(alias.lower(), info)
    from_name = None
    if text.lower() not in lookup:
        for suffix, sched in SCHEDULE_SUFFIXES.items():
            if text.lower().endswith(suffix.lower()) and text[: -len(suffix)].lower() in lookup:
                text, from_name = text[: -len(suffix)], sched
                break
    info = lookup.get(text.lower())
    if info is None:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}")
    return info, from_name
