"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser that wraps a denoiser, with A1111's prompt schedules
(a text chosen by step) and composable diffusion (Liu et al. 2022: several weighted prompts, A1111's AND)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ScheduledCond:
    """One prompt's conditioning over the steps: [(end_at_step, states), ...], as A1111's ScheduledPromptConditioning
    list. Step i (0 = the pass's first) uses the first entry whose end_at_step is at or after i, as A1111's
    reconstruct_cond_batch with its step counter starting at 0; past the last entry, the last one."""
    entries: list[tuple[int, torch.Tensor]]

    def at(self, step: int) -> torch.Tensor:
        for end, states in self.entries:
            if step <= end:
                return states
        return self.entries[-1][1]


@dataclass
class Conditioning:
    """The prompt's conditioning: one (weight, schedule) per part of an AND prompt (a single part of weight 1 for a
    prompt without AND). padding: the empty prompt's states [1, 77, width] (SDXL: its crossattn states), where texts
    of different lengths meet: the texts a step uses are padded with it to the longest of them (that step's, not
    the whole schedule's)."""
    parts: list[tuple[float, ScheduledCond]]
    padding: torch.Tensor | None = None


class CFGDenoiser:
    """D(x, sigma) = D_uncond + sum_i weight_i * scale * (D_cond_i - D_uncond), all in one batch (A1111's
    combine_denoised); one part of weight 1 is the familiar D_uncond + scale * (D_cond - D_uncond).

    cond: a Conditioning, or whatever the inner denoiser passes on to the network (text states, one row per image
    or one for all; or, for SDXL, a dict as A1111's of "crossattn" states and the UNet's "vector", each with the
    batch first); uncond: a ScheduledCond or states, or None (no guidance). With scale 1 and a single part of
    weight 1 only the conditional half is computed. `guidance_until` (0..1] lets guidance stop after that fraction
    of the sigmas, after which only the conditional parts are computed (the first part stands in for D_uncond, as
    A1111 does when it skips the unconditional half).

    Which step a call belongs to (for the schedules) comes from its sigma: the last of the pass's sigmas at or
    above it. A1111 counts model calls instead (and builds a second-order sampler's schedule for twice the
    steps); by the noise level, a sampler's extra calls inside a step (DPM2's and DPM++ 2S's midpoints) keep that
    step's text, and a step number means the same step for every sampler. For the samplers that call the model
    once per step at the step's own sigma, both give the same steps. Heun's correction, made at the next step's
    sigma, gets the next step's text; a call whose noise was raised by s_churn above the previous step's sigma,
    the previous step's.

    `min_uncond` is A1111's negative guidance minimum sigma (NGMS, s_min_uncond): below that sigma every second
    call skips the unconditional half, as a call past `guidance_until` does; `calls` counts the calls (A1111's
    step counter, which counts a second-order sampler's extra calls too) and `skipped` says whether any was.
    """

    def __init__(self, denoiser: Callable, scale: float = 7.0, sigmas: torch.Tensor | None = None,
                 guidance_until: float = 1.0, min_uncond: float = 0.0):
        self.denoiser = denoiser
        self.scale = float(scale)
        self.sigmas = sigmas
        self.min_uncond = float(min_uncond)
        self.calls, self.skipped = 0, False
        self.cutoff = None
        if sigmas is not None and guidance_until < 1.0:
            steps = len(sigmas) - 1
            last = max(int(round(steps * guidance_until)), 1)
            self.cutoff = float(sigmas[min(last, steps)])

    def step(self, sigma: float) -> int:
        """The pass's step a call at this sigma belongs to (0 without the pass's sigmas)."""
        if self.sigmas is None or len(self.sigmas) < 2:
            return 0
        return step_at(self.sigmas[:-1], sigma)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond, uncond=None, **extra) -> torch.Tensor:
        first_sigma = float(torch.as_tensor(sigma).reshape(-1)[0])
        step = self.step(first_sigma)
        parts = cond.parts if isinstance(cond, Conditioning) else [(1.0, ScheduledCond([(0, cond)]))]
        conds = [(w, _rows(s.at(step), x.shape[0])) for w, s in parts]
        single = len(conds) == 1 and conds[0][0] == 1.0
        guided = uncond is not None and (self.scale != 1.0 or not single)
        if guided and self.cutoff is not None and first_sigma <= self.cutoff:
            guided = False
        if guided and self.calls % 2 and first_sigma < self.min_uncond:
            guided, self.skipped = False, True
        self.calls += 1
        if single and not guided:
            return self.denoiser(x, sigma, cond=conds[0][1], **extra)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        states = [c for _, c in conds]
        if guided:
            states.insert(0, _rows(uncond.at(step) if isinstance(uncond, ScheduledCond) else uncond, x.shape[0]))
        n = len(states)
        padding = cond.padding if isinstance(cond, Conditioning) else None
        out = self.denoiser(torch.cat([x] * n), torch.cat([sigma] * n), cond=_cat(states, padding), **extra).chunk(n)
        if not guided:  # the first part's prediction stands in for the unconditional one, at scale 1
            return _combine(out[0], out, conds, 1.0)
        return _combine(out[0], out[1:], conds, self.scale)


def _combine(d_uncond: torch.Tensor, d_conds, conds, scale: float) -> torch.Tensor:
    denoised = d_uncond
    for d_cond, (weight, _) in zip(d_conds, conds):
        denoised = denoised + (d_cond - d_uncond) * (weight * scale)
    return denoised


def _rows(states, batch: int):
    """States with one row for all images -> one row per image (a copy, as the network has always been given);
    a dict of them (SDXL's crossattn and vector) entry by entry."""
    if isinstance(states, dict):
        return {key: _rows(value, batch) for key, value in states.items()}
    if not isinstance(states, torch.Tensor):
        raise TypeError("cond and uncond must be tensors or dicts of tensors")
    return states.repeat(batch, *[1] * (states.ndim - 1)) if states.shape[0] == 1 and batch > 1 else states


def _cat(states: list, padding: torch.Tensor | None = None):
    """The states of one call in one batch: shorter ones padded with `padding` (whole chunks) to the longest.
    Dicts (SDXL's) are joined entry by entry; only their "crossattn" states are padded."""
    if isinstance(states[0], dict):
        return {key: _cat([s[key] for s in states], padding if key == "crossattn" else None) for key in states[0]}
    longest = max(s.shape[1] for s in states)
    if padding is not None:
        states = [_padded(s, padding, longest) for s in states]
    for s in states[1:]:
        if s.shape[1:] != states[0].shape[1:]:
            raise ValueError(f"prompt and negative prompt encode to different shapes {list(s.shape)} and "
                             f"{list(states[0].shape)}")
    return torch.cat(states)


def _padded(states: torch.Tensor, padding: torch.Tensor, length: int) -> torch.Tensor:
    """states [B, tokens, width] followed by whole chunks of padding [1, chunk, width] up to `length` tokens."""
    missing = (length - states.shape[1]) // padding.shape[1]
    return torch.cat([states, padding.repeat(states.shape[0], missing, 1)], dim=1) if missing else states


def step_at(levels: torch.Tensor, level: float) -> int:
    """The step a model call at this noise level belongs to, given the steps' levels (sigmas or timesteps, falling):
    the last step whose level is at or above it (within float rounding); 0 above the first."""
    above = int((levels >= level * (1 - 1e-5)).sum())
    return max(above - 1, 0)
