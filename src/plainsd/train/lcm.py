"""Latent consistency distillation into a LoRA (Luo et al. 2023, "LCM-LoRA"): a model that draws in a few steps.

A consistency model maps any point of a sampling trajectory straight to its start, the clean latent, so that one
to four evaluations replace twenty. The distillation teaches that map to a LoRA on the frozen UNet:

1. a training latent is noised to a timestep t_n of a coarse grid (ddim_steps points: skips of k = 1000 / 50);
2. the teacher, the base model without the LoRA, guided (CFG weight w drawn per sample), takes one DDIM step (or
   with extra.solver "heun" a second-order one, as LCM allows any ODE solver) from t_n to t_n - k: a point on
   (nearly) the same trajectory, one grid step cleaner;
3. the student, the model with the LoRA, estimates the clean latent from t_n; the target is the estimate from
   the teacher's point, without gradients, of the target network: the online weights (the LCM-LoRA recipe's),
   or with extra.target_ema an exponential moving average of them (LCM's, decay 0.95), which moves slower;
4. both estimates pass through the consistency boundary condition (c_skip, c_out: the identity at t = 0), and a
   pseudo-Huber loss pulls the first toward the second.

With extra.objective "trajectory" the target is not bootstrapped: the student learns only the timesteps the LCM
sampler visits (student_timesteps), and its target from x_t is where the guided teacher's whole trajectory from
x_t ends, solved once per run by plainsd's DPM++ 2M (trajectory_pairs), as in direct distillation of a sampler's
steps (Luhman & Luhman 2021, "Knowledge Distillation in Iterative Generative Models for Improved Sampling
Speed").

The student sees no guidance at inference (CFG 1, one UNet call per step): the teacher's guidance is distilled in.
The LoRA is saved in kohya's format with every Linear and convolution of the UNet adapted, as LCM-LoRA does, so
that A1111 and ComfyUI read it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open

from .. import lora as lora_mod
from ..diffusion import samplers, schedules
from ..diffusion.denoisers import DiscreteDenoiser, LCMDenoiser, boundary_scalings
from ..weights import write_safetensors
from . import dist
from .loop import TrainConfig, train
from .settings import RecipeSettings

LORA_FILE = "lcm-lora.safetensors"
PAIRS_FILE = "trajectory_pairs.safetensors"
PAIRS_BATCH = 256  # pairs whose teacher solutions are computed together
SAMPLE_STEPS = (1, 2, 4, 8)


@dataclass
class LCMSettings(RecipeSettings):
    recipe: ClassVar[str] = "lcm"
    base: str | None = None        # the teacher: a whole checkpoint; None: the shipped model
    rank: int = 32                 # the LoRA's rank, on every Linear and convolution of the UNet
    alpha: float | None = None     # kohya's alpha (None: the rank, a scale of 1)
    w_min: float = 1.0             # the teacher's guidance weight w, drawn uniformly per sample from [w_min, w_max];
    w_max: float = 4.0             # CFG scale = w + 1 (LCM's convention)
    guidance_min_t: int = 0        # the teacher guides only at timesteps from this one up (0: at all of them)
    ddim_steps: int = 50           # the solver's grid: each teacher step skips 1000 / ddim_steps timesteps
    solver: str = "ddim"           # the teacher's ODE solver over one skip: "ddim" (LCM's) or "heun" (second order)
    loss: str = "huber"            # "huber" (pseudo-Huber with huber_c) or "l2"
    huber_c: float = 0.001
    target_ema: float = 0.0        # the target network's LoRA: 0 the online weights; else an EMA with this decay
    latent_cache: int = 16384      # pictures whose posteriors are encoded once and trained on
    objective: str = "consistency"  # "consistency" (bootstrapped, above) or "trajectory" (the teacher's ODE solution)
    student_steps: tuple[int, ...] = (1, 2, 4)  # trajectory: trained on the timesteps the LCM sampler visits at these
    solve_steps: int = 16          # trajectory: DPM++ 2M steps (karras sigmas) of the teacher's solution to sigma 0
    pairs: int = 8192              # trajectory: (x_t, t, caption, target) pairs computed once per run and trained on

    CONSISTENCY_ONLY: ClassVar[tuple] = ("ddim_steps", "solver", "target_ema")
    TRAJECTORY_ONLY: ClassVar[tuple] = ("student_steps", "solve_steps", "pairs")

    def check(self):
        if self.rank < 1:
            raise ValueError(f"extra.rank of the lcm recipe must be at least 1, not {self.rank}")
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"extra.w_min and extra.w_max of the lcm recipe must satisfy 0 <= w_min <= w_max, "
                             f"not {self.w_min} and {self.w_max}")
        if self.ddim_steps < 2 or 1000 % self.ddim_steps:
            raise ValueError(f"extra.ddim_steps of the lcm recipe must divide 1000 (50 is LCM's), not {self.ddim_steps}")
        if self.solver not in ("ddim", "heun"):
            raise ValueError(f"extra.solver of the lcm recipe is 'ddim' or 'heun', not {self.solver!r}")
        if self.loss not in ("huber", "l2"):
            raise ValueError(f"extra.loss of the lcm recipe is 'huber' or 'l2', not {self.loss!r}")
        if self.latent_cache < 1:
            raise ValueError(f"extra.latent_cache of the lcm recipe must be at least 1, not {self.latent_cache}")
        if not 0 <= self.target_ema < 1:
            raise ValueError(f"extra.target_ema of the lcm recipe is a decay in [0, 1) (0: the online weights), "
                             f"not {self.target_ema}")
        if self.objective not in ("consistency", "trajectory"):
            raise ValueError(f"extra.objective of the lcm recipe is 'consistency' or 'trajectory', "
                             f"not {self.objective!r}")
        if not self.student_steps or min(self.student_steps) < 1:
            raise ValueError(f"extra.student_steps of the lcm recipe is a non-empty list of step counts of at least 1 "
                             f"(the LCM sampler's, whose timesteps the student learns), not {list(self.student_steps)}")
        if self.solve_steps < 1:
            raise ValueError(f"extra.solve_steps of the lcm recipe must be at least 1, not {self.solve_steps}")
        if self.pairs < 1:
            raise ValueError(f"extra.pairs of the lcm recipe must be at least 1, not {self.pairs}")
        other = self.CONSISTENCY_ONLY if self.objective == "trajectory" else self.TRAJECTORY_ONLY
        defaults = LCMSettings()
        for name in other:
            if getattr(self, name) != getattr(defaults, name):
                raise ValueError(f"extra.{name} of the lcm recipe is a setting of the other objective, not of "
                                 f"extra.objective {self.objective!r}; leave it out")


def x0_and_eps(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction: str):
    """The clean latent and the noise a UNet output (eps, v or x0) implies at x, a = alpha_bar of x's timestep."""
    if prediction == "eps":
        return (x - (1 - a).sqrt() * out) / a.sqrt(), out
    if prediction == "x0":
        return out, (x - a.sqrt() * out) / (1 - a).sqrt()
    return a.sqrt() * x - (1 - a).sqrt() * out, (1 - a).sqrt() * x + a.sqrt() * out


def consistency_loss(unet, latents, cond, uncond, s: LCMSettings, prediction: str, g: torch.Generator,
                     adapters: dict, rows: slice | None = None, target: dict | None = None) -> torch.Tensor:
    """One batch of latent consistency distillation (steps 1-4 of the module's docstring). rows: the networks
    run on these rows only (one process's share, dist.rows); the random draws still cover the whole batch.
    target: the target network's adapter weights (named as train() names them); None: the online ones."""
    ac = schedules.alphas_cumprod()
    k = len(ac) // s.ddim_steps
    n = latents.shape[0]
    start = (torch.randint(1, s.ddim_steps + 1, (n,), generator=g) * k - 1)  # the grid: k-1, 2k-1, ..., 999
    prev = (start - k).clamp(min=0)
    noise = torch.randn(latents.shape, generator=g)
    x = schedules.add_noise(latents, noise, start, ac)
    a_n, a_p = (ac[t].view(-1, 1, 1, 1) for t in (start, prev))
    w = s.w_min + (s.w_max - s.w_min) * torch.rand(n, generator=g)
    w = torch.where(start >= s.guidance_min_t, w, torch.zeros_like(w)).view(-1, 1, 1, 1)
    if rows is not None:
        x, start, prev, a_n, a_p, w, cond, uncond = (v[rows] for v in (x, start, prev, a_n, a_p, w, cond, uncond))

    with torch.no_grad(), _adapters_off(adapters):  # the teacher: the base model, guided; one solver step
        x_prev = teacher_step(unet, x, (start, prev), (a_n, a_p), cond, uncond, w, prediction, s.solver)

    with torch.no_grad(), (_weights_of(adapters, target) if target else contextlib.nullcontext()):
        target = consistency_estimate(unet, x_prev, prev, a_p, cond, prediction)
    return distance(consistency_estimate(unet, x, start, a_n, cond, prediction), target, s)


def consistency_estimate(unet, x, t, a, cond, prediction: str) -> torch.Tensor:
    """The consistency function f(x, t): the network's clean estimate at x (DDPM scaling, a = alpha_bar of t)
    through the boundary condition, c_skip(t) x + c_out(t) x0, as the LCM sampler applies it at inference."""
    skip, out = (c.view(-1, 1, 1, 1) for c in boundary_scalings(t))
    return skip * x + out * x0_and_eps(unet(x, t, cond).float(), x, a, prediction)[0]


def distance(pred: torch.Tensor, target: torch.Tensor, s: LCMSettings) -> torch.Tensor:
    """The recipe's loss between estimate and target: pseudo-Huber with s.huber_c, or the mean squared error."""
    if s.loss == "l2":
        return torch.nn.functional.mse_loss(pred, target)
    return (((pred - target) ** 2 + s.huber_c**2).sqrt() - s.huber_c).mean()


def teacher_step(unet, x, t: tuple, a: tuple, cond, uncond, w, prediction: str, solver: str) -> torch.Tensor:
    """One guided step of the probability-flow ODE from timestep t[0] to t[1] (a: their alpha_bar): DDIM, or Heun
    (Karras et al. 2022), which corrects DDIM's step with the guided noise estimate at its end point."""
    def guided_eps(x, t, a):
        out_c, out_u = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).float().chunk(2)
        eps_c, eps_u = x0_and_eps(out_c, x, a, prediction)[1], x0_and_eps(out_u, x, a, prediction)[1]
        return eps_c + w * (eps_c - eps_u)

    # in k-diffusion's variables, x / sqrt(a) = x0 + sigma eps with sigma = sqrt((1 - a) / a), DDIM is Euler's step
    sigma_n, sigma_p = (((1 - v) / v).sqrt() for v in a)
    d_n = guided_eps(x, t[0], a[0])
    x_prev = a[1].sqrt() * (x / a[0].sqrt() + d_n * (sigma_p - sigma_n))
    if solver == "ddim":
        return x_prev
    d_p = guided_eps(x_prev, t[1], a[1])
    return a[1].sqrt() * (x / a[0].sqrt() + (d_n + d_p) / 2 * (sigma_p - sigma_n))


def student_timesteps(steps) -> list[int]:
    """The UNet timesteps the LCM sampler visits at each of these step counts, their union, high to low: its
    denoiser's (LCMDenoiser, as the pipeline runs it) at the sigmas of its own schedule ("automatic")."""
    schedule = samplers.resolve_sampler("LCM")[1]
    denoiser = LCMDenoiser(None)
    visited = {int(t) for n in steps for t in denoiser.sigma_to_t(denoiser.get_sigmas(n, schedule)[:-1])}
    return sorted(visited, reverse=True)


def guided_teacher(unet, prediction: str, guidance_min_t: int = 0):
    """The base model as k-diffusion's denoiser D(x, sigma, cond, uncond, w) for plainsd's samplers: x in the sigma
    scaling, classifier-free guidance D_c + w (D_c - D_u) (CFG scale w + 1, w one per row) at the timesteps from
    guidance_min_t up, the conditional estimate alone below (as consistency_loss's teacher guides)."""
    base = DiscreteDenoiser(lambda x, t, cond: unet(x, t, cond).float(), prediction)

    def denoise(x, sigma, cond, uncond, w):
        w = torch.where(base.sigma_to_t(sigma.cpu()) >= guidance_min_t, w, torch.zeros_like(w))
        if not w.any():
            return base(x, sigma, cond=cond)
        d_c, d_u = base(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond])).chunk(2)
        return d_c + w.view(-1, 1, 1, 1) * (d_c - d_u)

    return denoise


@torch.no_grad()
def teacher_solution(teacher, x, t: int, cond, uncond, w, solve_steps: int) -> torch.Tensor:
    """The teacher's probability-flow ODE solved from x (DDPM scaling, every row at timestep t) down to sigma 0 by
    plainsd's DPM++ 2M on karras sigmas from sigma(t): the clean latent at the end of x's trajectory. Dividing by
    sqrt(alpha_bar(t)) brings x to the sigma scaling; at sigma 0 the two scalings agree."""
    ac = schedules.alphas_cumprod()
    sigma = float(schedules.sigmas_from_alphas_cumprod(ac)[t])
    sigmas = schedules.get_sigmas_karras(solve_steps, float(schedules.sigmas_from_alphas_cumprod(ac)[0]), sigma)
    extra = {"cond": cond, "uncond": uncond, "w": w}
    return samplers.sample_dpmpp_2m(teacher, x / ac[t].sqrt(), sigmas, extra_args=extra, disable=True)


@torch.no_grad()
def trajectory_pairs(sd, cache, uncond_row, s: LCMSettings, seed: int, adapters: dict, path: Path | None,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """s.pairs training pairs of the trajectory objective: x (a cached latent noised to t, a timestep of
    student_timesteps), t, caption (its index in the cache) and target, the teacher's solution from x. Kept in
    `path`, read back while what made them is the same: the settings, the cached latents and captions, and the
    frozen weights of the teacher (a resumed run does not recompute them). Batch i of PAIRS_BATCH pairs is drawn
    from its own seeded generator, so under torchrun each process solves every size()-th batch and they share them."""
    inputs = hashlib.sha256("\n".join(cache[2]).encode())
    frozen = [p for m in (sd.unet, sd.text_encoder) for p in m.parameters() if not p.requires_grad]
    for tensor in (cache[0], cache[1], *frozen):
        inputs.update(tensor.detach().float().contiguous().numpy().tobytes())
    key = json.dumps({"seed": seed, "inputs": inputs.hexdigest(), **{k: getattr(s, k) for k in (
        "w_min", "w_max", "guidance_min_t", "student_steps", "solve_steps", "pairs")}})
    if path is not None and path.is_file():
        with safe_open(str(path), "pt") as f:
            if f.metadata().get("plainsd.pairs") == key:
                return {k: f.get_tensor(k) for k in f.keys()}
    from tqdm.auto import tqdm

    from .recipes import sample_posterior

    teacher = guided_teacher(sd.unet, sd.config.prediction, s.guidance_min_t)
    timesteps = torch.tensor(student_timesteps(s.student_steps))
    batches = range(0, s.pairs, PAIRS_BATCH)
    mine = list(batches)[dist.rank()::dist.size()]
    made = {}
    with _adapters_off(adapters):
        for start in tqdm(mine, desc="teacher trajectories", disable=not (progress and dist.is_main())):
            n = min(PAIRS_BATCH, s.pairs - start)
            g = torch.Generator().manual_seed(seed * 1_000_003 + start)
            idx = torch.randint(len(cache[2]), (n,), generator=g)
            t = timesteps[torch.randint(len(timesteps), (n,), generator=g)]
            z = sample_posterior(cache[0][idx], cache[1][idx], g) * sd.config.scale_factor
            x = schedules.add_noise(z, torch.randn(z.shape, generator=g), t, schedules.alphas_cumprod())
            w = s.w_min + (s.w_max - s.w_min) * torch.rand(n, generator=g)
            cond = sd.text_encoder(sd.tokenizer([cache[2][i] for i in idx]))
            target = torch.empty_like(x)
            for step in t.unique().tolist():  # one solve per timestep: a sampler's sigmas are the batch's
                rows = t == step
                target[rows] = teacher_solution(teacher, x[rows], step, cond[rows],
                                                uncond_row.expand_as(cond[rows]), w[rows], s.solve_steps)
            made[start] = {"x": x, "t": t, "caption": idx, "w": w, "target": target}
    made = dist.share(made)
    pairs = {k: torch.cat([made[i][k] for i in batches]) for k in ("x", "t", "caption", "w", "target")}
    if path is not None and dist.is_main():
        write_safetensors(pairs, path, {"plainsd.pairs": key})
    return pairs


def trajectory_loss(unet, pairs: dict, idx: list[int], cond, s: LCMSettings, prediction: str,
                    rows: slice | None = None) -> torch.Tensor:
    """One batch of trajectory distillation: the student's consistency estimate at these pairs' (x, t) pulled
    toward their teacher solutions. cond: the pairs' caption states; rows as in consistency_loss."""
    x, t, target = (pairs[k][idx] for k in ("x", "t", "target"))
    x, t, target, cond = dist.take(rows, x, t, target, cond)
    a = schedules.alphas_cumprod()[t].view(-1, 1, 1, 1)
    return distance(consistency_estimate(unet, x, t, a, cond, prediction), target, s)


@contextlib.contextmanager
def _adapters_off(adapters: dict):
    """The model without its LoRA adapters for the duration of the block (the teacher)."""
    scales = {k: a.scale for k, a in adapters.items()}
    for a in adapters.values():
        a.scale = 0.0
    try:
        yield
    finally:
        for k, a in adapters.items():
            a.scale = scales[k]


def train_lcm(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """`plainsd train lcm`: the base model's UNet frozen, a LoRA on all of its Linear and convolution layers
    trained by consistency_loss (or, with extra.objective "trajectory", trajectory_loss on trajectory_pairs) on
    cached latents of the shapes world; exports lcm-lora.safetensors (kohya)."""
    from .recipes import _frozen_base, _latent_cache, dataset, sample_posterior

    s = LCMSettings.from_extra(cfg.extra)
    sd = _frozen_base(s.base)
    torch.manual_seed(cfg.seed)
    adapters = lora_mod.attach(sd, rank=s.rank, alpha=s.alpha, targets="all")
    params = {f"{k}.{n}": p for k, a in adapters.items() for n, p in a.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    cache = _latent_cache(sd.vae, dataset(cfg, sd.config.resolution), s.latent_cache, progress)
    with torch.no_grad():
        uncond_row = sd.text_encoder(sd.tokenizer([""]))
    out = Path(cfg.out)
    target = _TargetEMA(params, s.target_ema) if s.target_ema else None
    if s.objective == "trajectory":
        out.mkdir(parents=True, exist_ok=True)
        pairs = trajectory_pairs(sd, cache, uncond_row, s, cfg.seed, adapters, out / PAIRS_FILE, progress)

    def loss_fn(step, micro):
        if target is not None and micro == 0:
            target.update(params, step)
        g = torch.Generator().manual_seed(step * 7919 + micro)
        rng = random.Random(f"{cfg.seed}:{step}:{micro}")
        if s.objective == "trajectory":
            idx = [rng.randrange(s.pairs) for _ in range(cfg.batch_size)]
            with torch.no_grad():
                cond = sd.text_encoder(sd.tokenizer([cache[2][i] for i in pairs["caption"][idx].tolist()]))
            return trajectory_loss(sd.unet, pairs, idx, cond, s, sd.config.prediction, dist.rows(len(idx)))
        idx = [rng.randrange(len(cache[2])) for _ in range(cfg.batch_size)]
        latents = sample_posterior(cache[0][idx], cache[1][idx], g) * sd.config.scale_factor
        with torch.no_grad():
            cond = sd.text_encoder(sd.tokenizer([cache[2][i] for i in idx]))
        uncond = uncond_row.expand_as(cond)
        return consistency_loss(sd.unet, latents, cond, uncond, s, sd.config.prediction, g, adapters,
                                dist.rows(len(idx)), target.shadow if target is not None else None)

    def export(step, weights):
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(s.rank),
                "ss_network_alpha": str(s.alpha if s.alpha is not None else s.rank), "ss_steps": str(step),
                "ss_base_model": sd.name, "plainsd.recipe": json.dumps(dataclasses.asdict(cfg))}
        with _weights_of(adapters, weights):
            write_safetensors(lora_mod.adapters_state(adapters), out / LORA_FILE, meta)

    def sample(step, weights):
        with _weights_of(adapters, weights):
            sheet = lcm_samples(sd)
        (out / "samples").mkdir(exist_ok=True)
        sheet.save(out / "samples" / f"lcm-{step:06d}.png")

    return train(cfg, params, loss_fn, resume, sample, export, progress)


class _TargetEMA:
    """The target network's adapter weights: an exponential moving average of the trained ones, updated once per
    step before its loss (so after the previous step's optimizer step). A resumed run starts it again from the
    checkpoint's weights: with LCM's decay of 0.95 it forgets its start within a few dozen steps."""

    def __init__(self, params: dict, decay: float):
        self.decay, self.step = decay, None
        self.shadow = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict, step: int):
        if self.step is None:
            for k, p in params.items():
                self.shadow[k].copy_(p)
        elif step != self.step:
            for k, p in params.items():
                self.shadow[k].lerp_(p.detach(), 1 - self.decay)
        self.step = step


@contextlib.contextmanager
def _weights_of(adapters: dict, weights: dict):
    """The adapters with these weights (the EMA's, named as train() names them) for the duration of the block."""
    params = {f"{k}.{n}": p for k, a in adapters.items() for n, p in a.named_parameters()}
    saved = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])


@torch.no_grad()
def lcm_samples(sd, prompts: list[str] | None = None):
    """A contact sheet: a row of pictures per step count of SAMPLE_STEPS, LCM sampler, CFG 1."""
    from ..images import contact_sheet
    from ..pipeline import txt2img
    from .recipes import SAMPLE_PROMPTS

    prompts = prompts or SAMPLE_PROMPTS
    pics = [txt2img(sd, p, steps=n, cfg_scale=1.0, sampler="LCM", seed=i).images[0]
            for n in SAMPLE_STEPS for i, p in enumerate(prompts)]
    return contact_sheet(pics, columns=len(prompts))
