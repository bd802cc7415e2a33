"""Fast mode: trade a little exactness for speed, each part switchable and measured (benchmarks/).

1. DeepCache (Ma, Fang & Wang 2023): a UNet's deep features change slowly from one sampling step to the
   next. Every `interval`-th call runs the whole UNet and keeps the features that enter its last
   `depth` output blocks; the calls in between run only the first `depth` input blocks (full resolution)
   and those last output blocks on the kept features. The first `deepcache_start` of the steps, where
   the picture's layout, shapes and colours are decided and the features change fastest, always run the
   whole UNet (the paper's non-uniform schedule makes the same point by spacing its full steps closer early).
   The last `deepcache_end` of the steps can run it whole too (off in fast mode: whether it helps is one of
   the variants benchmarks/fast_adherence.py measures). The cheap calls of the first `deepcache_early` of the
   steps can run more blocks (`deepcache_early_depth`) than the later ones: the middle steps, where the shapes
   form, lose most from the cached features, and the extra blocks cost most on the guided (batch 2) steps anyway.
   The last `deepcache_late` of the steps, where only details change, can run the whole UNet less often:
   on the first of them, then every `deepcache_late_interval`-th call after the last whole pass.
2. Guidance cut-off: classifier-free guidance only for the first `guidance_until` of the steps; after
   that the unconditional half of the batch is not computed (CFGDenoiser's guidance_until).
3. A tiny VAE decoder (TAESD's architecture, models/taesd.py) instead of SD's decoder at the end. Not part
   of the default fast mode (--fast): on the shipped model it costs more adherence than the other two parts
   together (benchmarks/fast_adherence.py) and saves a small share of fast mode's time (benchmarks/fast_speed.md);
   --tiny-decoder adds it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from .models.unet import add_adapter_middle, add_control


@dataclass
class FastSettings:
    deepcache_interval: int = 2     # 1 = off
    deepcache_depth: int = 1        # how many input / output blocks run on the cheap steps
    deepcache_start: float = 0.0    # fraction of the steps that run the whole UNet before caching starts
    deepcache_end: float = 0.0      # fraction of the steps at the end (the least noisy) that run the whole UNet
    deepcache_early: float = 0.0    # fraction of the steps, from the start, whose cheap calls run ...
    deepcache_early_depth: int = 2  # ... this many blocks instead of deepcache_depth
    deepcache_late: float = 0.0     # fraction of the steps at the end whose whole UNet runs ...
    deepcache_late_interval: int = 4  # ... every this many calls instead of deepcache_interval
    guidance_until: float = 0.6     # fraction of the steps that get classifier-free guidance
    tiny_decoder: bool = False      # decode with the model's TAESD decoder when it has one


# --fast: DeepCache with 2 blocks on the cheap calls of the first 40% of the steps and 1 after; the whole UNet every
# 2nd step, except on the last 40% (where guidance has stopped and only details change), every 4th; guidance for the
# first 60%. The late part's longer interval is faster and keeps the adherence of every 2nd step to the end. Its
# adherence beside the default path: benchmarks/fast_adherence.py; its speed: benchmarks/results-amx.md and
# benchmarks/fast_speed.md.
FAST = FastSettings(deepcache_early=0.4, deepcache_late=0.4)


def choose(fast: bool, tiny_decoder: bool = False) -> FastSettings | None:
    """What --fast and --tiny-decoder ask for: fast mode's settings, the tiny decoder alone, both, or None."""
    if not tiny_decoder:
        return FAST if fast else None
    if fast:
        return dataclasses.replace(FAST, tiny_decoder=True)
    return FastSettings(deepcache_interval=1, guidance_until=1.0, tiny_decoder=True)


class DeepCacheUNet:
    """Calls the UNet like unet(x, t, context), running it whole only every `interval` calls."""

    def __init__(self, unet: torch.nn.Module, interval: int = 3, depth: int = 1, warmup: int = 0,
                 whole_from_t: float | None = None, early_depth: int | None = None, early_until_t: float | None = None,
                 late_interval: int | None = None, late_from_t: float | None = None):
        """whole_from_t: calls at this timestep or a smaller one (the end of sampling) run the whole UNet.
        early_depth: the cheap calls at timesteps above early_until_t (the start of sampling) run this many blocks.
        late_interval: calls at late_from_t or a smaller timestep run the whole UNet on the first of them and then
        whenever late_interval calls have passed since the last whole pass."""
        n = len(unet.output_blocks)
        if (interval < 1 or (late_interval or interval) < 1 or not 1 <= depth < n or not 1 <= (early_depth or depth) < n
                or warmup < 0):
            raise ValueError(f"DeepCache needs intervals >= 1, depths from 1 to {n - 1} and warmup >= 0, got "
                             f"{interval} and {late_interval}, {depth} and {early_depth}, and {warmup}")
        self.unet, self.interval, self.depth, self.warmup = unet, interval, depth, warmup
        self.late_depth, self.early_depth, self.early_until_t = depth, early_depth, early_until_t
        self.whole_from_t = whole_from_t
        self.late_interval, self.late_from_t = late_interval, late_from_t
        self.calls, self.full_calls = 0, 0
        self.late_calls, self.since_full = 0, 0  # calls in the late part so far; since the last whole pass, this one included
        self.cached: torch.Tensor | None = None

    def reset(self) -> None:
        """Start again (a new batch, the hires fix's second pass): the next call runs the whole UNet."""
        self.cached, self.calls, self.late_calls, self.since_full = None, 0, 0, 0

    def around(self, unet: torch.nn.Module) -> DeepCacheUNet:
        """The same schedule around another UNet (a refiner's, which takes over part of the way), from a fresh
        start."""
        other = copy.copy(self)
        other.unet, other.full_calls, other.warmup = unet, 0, 0  # (sampling is under way: its first call runs whole)
        other.reset()
        return other

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, control=None,
                 adapter: list[torch.Tensor] | None = None, guidance: torch.Tensor | float | None = None,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        """control: ControlNet residuals as a function of how many input blocks the call runs (None: all), as
        control.ControlledUNet gives them: a whole call adds them all, a cheap call those of its outer blocks.
        adapter: T2I-Adapter features (unet.run_input_blocks), added in whichever input blocks the call runs.
        guidance: an LCM-distilled UNet's guidance scale, y: an SDXL UNet's vector (UNetModel.forward)."""
        unet, dtype = self.unet, self.unet.dtype
        whole = self._runs_whole(timesteps, x.shape[0])
        emb = unet.embed_timesteps(timesteps, x.shape[0], guidance, y)
        h, context = x.to(dtype), context.to(dtype)
        cut = len(unet.output_blocks) - self.depth  # the output block whose input features are kept
        if whole:
            self.full_calls += 1
            skips = unet.run_input_blocks(h, emb, context, adapter=adapter)
            h = add_adapter_middle(unet.middle_block(skips[-1], emb, context), adapter, unet.config)
            if control is not None:
                skips, h = add_control(skips, h, control(None))
            self.cached = h = unet.run_output_blocks(h, skips, emb, context, stop=cut)
        else:
            skips = unet.run_input_blocks(h, emb, context, stop=self.depth, adapter=adapter)
            if control is not None:
                skips = [s + c.to(s.dtype) for s, c in zip(skips, control(self.depth))]
            h = self.cached
        h = unet.run_output_blocks(h, skips, emb, context, start=cut)
        return unet.out(h).to(x.dtype)

    def _runs_whole(self, timesteps: torch.Tensor, batch: int) -> bool:
        """Whether this call runs the whole UNet (else the outer `self.depth` blocks on the kept features); sets
        the depth for this part of sampling and counts the call."""
        t = float(torch.as_tensor(timesteps).max())
        since = self.calls - max(self.warmup - 1, 0)  # the last warm-up call counts as the first full one
        if self.early_depth is not None:
            depth = self.early_depth if t > self.early_until_t + 1e-4 else self.late_depth
            if depth != self.depth:  # the kept features sit before a different block: refill them
                self.depth, self.cached = depth, None
        late = self.late_interval is not None and self.late_from_t is not None and t <= self.late_from_t + 1e-4
        every = (self.late_calls == 0 or self.since_full >= self.late_interval) if late else since % self.interval == 0
        whole = (self.calls < self.warmup or every or self.cached is None or self.cached.shape[0] != batch
                 or (self.whole_from_t is not None and t <= self.whole_from_t + 1e-4))
        self.calls += 1
        self.late_calls += late
        self.since_full = 1 if whole else self.since_full + 1
        return whole
