"""plainsd's own x4 upscaler for the shipped model: Real-ESRGAN's compact network trained on the shapes world.

The shapes world renders any scene at any size, so every low-resolution picture has an exact high-resolution
truth: the same scene drawn at scale times the size. The input is the small render degraded as the generator
degrades its pictures: through the shipped VAE (encode, a sample of the posterior, decode), rounded to 8 bits
as a saved picture is; extra.plain_share of the inputs are the plain render instead. The loss is on random crops
(the network sees only a few pixels around each one, so crops teach it as whole pictures do, at a fraction of the
cost), optionally weighted towards the objects' pixels and plus an L1 on the image gradients that rewards sharp edges.

The loss is the mean squared error, not the L1 of Real-ESRGAN's pre-training: nine pixels in ten of this world are
flat background, where nearest neighbour is already right but for the VAE's faint noise, and the L1's equal pull
towards the median there held the network at zero (its output stayed the nearest-neighbour enlargement, below
Lanczos), where the squared error, dominated by the edges, taught it (benchmarks/upscaler_quality.md).

The exported file holds nothing but Real-ESRGAN's own keys, so spandrel (A1111, ComfyUI, plainsd.upscale) reads it.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image

from ..config import UpscalerConfig
from ..images import contact_sheet, to_pil, to_tensor
from ..models.upscaler import CompactUpscaler
from ..weights import DEFAULT_MODEL, write_safetensors
from .data import render
from .loop import TrainConfig, train
from .settings import RecipeSettings


LOSSES = ("mse", "l1")


@dataclass
class UpscalerSettings(RecipeSettings):
    """An upscaler for the pictures of a model (its VAE makes the inputs)."""
    recipe: ClassVar[str] = "upscaler"
    model: str | None = None      # the checkpoint (or VAE file) whose VAE round trip degrades the inputs; None: shipped
    size: int = 64                # the small pictures' side (the model's resolution)
    scale: int = 4                # the targets are the same scenes rendered at scale * size
    num_feat: int = 48            # the network's channels
    num_conv: int = 12            # its convolutions between the first and the last
    pairs: int = 4096             # scenes rendered at both sizes (and degraded) once, then trained on
    crop: int = 32                # side of the input crops (the targets' is crop * scale)
    plain_share: float = 0.0      # share of the inputs that are the plain small render, not the VAE round trip
    loss: str = "mse"             # "mse" (squared error) or "l1"
    object_weight: float = 1.0    # the objects' pixels weigh this many times the background's in the loss
    edge_weight: float = 0.0      # weight of the L1 between the output's and the target's image gradients
    fp16: bool = True             # export the file in float16

    def check(self):
        if self.scale not in (1, 2, 3, 4, 8) or self.size < 8 or not 1 <= self.crop <= self.size:
            raise ValueError(f"the upscaler recipe needs extra.scale in 1, 2, 3, 4, 8, extra.size at least 8 and "
                             f"extra.crop between 1 and size; got {self.scale}, {self.size}, {self.crop}")
        if self.num_feat < 1 or self.num_conv < 0 or self.pairs < 1:
            raise ValueError(f"extra.num_feat and extra.pairs must be at least 1 and extra.num_conv at least 0, got "
                             f"{self.num_feat}, {self.pairs}, {self.num_conv}")
        if self.loss not in LOSSES:
            raise ValueError(f"extra.loss of the upscaler recipe must be one of {', '.join(LOSSES)}, not {self.loss!r}")
        if not 0 <= self.plain_share <= 1 or self.object_weight <= 0 or self.edge_weight < 0:
            raise ValueError(f"extra.plain_share must be in [0, 1], extra.object_weight above 0 and extra.edge_weight "
                             f"at least 0; got {self.plain_share}, {self.object_weight}, {self.edge_weight}")


def to_bytes(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8, rounded as a saved picture is (images.to_pil)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1], the range upscalers work in."""
    return images.float() / 255


def render_pairs(scenes, size: int, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scene drawn at size and at scale * size, as uint8 [N, 3, H, W]."""
    small = torch.cat([to_bytes(to_tensor(render(s, size))) for s in scenes])
    large = torch.cat([to_bytes(to_tensor(render(s, size * scale))) for s in scenes])
    return small, large


@torch.no_grad()
def vae_round_trip(vae, small: torch.Tensor, generator: torch.Generator | None = None, batch: int = 64) -> torch.Tensor:
    """uint8 pictures through the VAE: encoded, a sample of the posterior decoded (its mean without a generator),
    rounded back to uint8: what the generator's pictures look like at their best."""
    out = []
    for chunk in small.split(batch):
        x = (to_unit(chunk) * 2 - 1).to(vae.dtype)
        posterior = vae.encode(x)
        z = posterior.mode() if generator is None else posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=generator, dtype=posterior.mean.dtype)
        out.append(to_bytes(vae.decode(z)))
    return torch.cat(out)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error averaged with per-pixel weights [B, 1, H, W] (plain MSE for None), as recipes.weighted_l1."""
    if weights is None:
        return F.mse_loss(pred, target)
    return ((pred - target) ** 2 * weights).sum() / (weights.sum() * pred.shape[1])


def gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical differences of neighbouring pixels: small when the edges are as sharp
    and as placed as the target's."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (F.l1_loss(dx(pred), dx(target)) + F.l1_loss(dy(pred), dy(target))) / 2


def init_weights(net: CompactUpscaler) -> None:
    """He initialisation for the convolutions before a PReLU (the variance kept through each layer: PyTorch's default
    shrinks a signal about threefold per layer, and through a dozen layers the first ones learnt nothing), and the last
    one near zero, so that training starts from the nearest-neighbour enlargement the network adds to its output."""
    convs = [m for m in net.body if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convs[:-1]:
            torch.nn.init.kaiming_normal_(conv.weight, a=0.25, nonlinearity="leaky_relu")  # PReLU's initial slope
            conv.bias.zero_()
        convs[-1].weight.mul_(0.1)
        convs[-1].bias.zero_()


def training_pairs(cfg: TrainConfig, s: UpscalerSettings, vae, progress: bool = True):
    """(inputs, targets) uint8 of extra.pairs scenes of the config's data: the small renders degraded (the first
    plain_share of them left plain), the large renders as they are."""
    from tqdm.auto import tqdm

    from .recipes import dataset

    ds = dataset(cfg, s.size)
    small, large = [], []
    for start in tqdm(range(0, s.pairs, 64), desc="rendering pairs", disable=not progress):
        pair = render_pairs([ds.scene(i % len(ds)) for i in range(start, min(start + 64, s.pairs))], s.size, s.scale)
        small.append(pair[0])
        large.append(pair[1])
    small, large = torch.cat(small), torch.cat(large)
    plain = round(s.plain_share * s.pairs)
    degraded = vae_round_trip(vae, small[plain:], torch.Generator().manual_seed(cfg.seed)) if plain < s.pairs else small[:0]
    return torch.cat([small[:plain], degraded]), large


def _crops(inputs, targets, idx, s: UpscalerSettings, rng: random.Random):
    """Aligned random crops: crop x crop of each input, the same place's (crop * scale)^2 of its target."""
    xs, ys = [], []
    for i in idx:
        top, left = rng.randrange(s.size - s.crop + 1), rng.randrange(s.size - s.crop + 1)
        xs.append(inputs[i, :, top:top + s.crop, left:left + s.crop])
        k = s.scale
        ys.append(targets[i, :, top * k:(top + s.crop) * k, left * k:(left + s.crop) * k])
    return to_unit(torch.stack(xs)), to_unit(torch.stack(ys))


def train_upscaler(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train the compact upscaler on (degraded small render, large render) pairs; writes upscaler.safetensors (the
    EMA weights when cfg.ema_decay > 0) with the recipe, the data seed and the step in its metadata."""
    from .recipes import _named, _swapped, load_vae, object_weights, weighted_l1

    s = UpscalerSettings.from_extra(cfg.extra)
    if cfg.data.get("kind", "shapes") != "shapes":
        raise ValueError("the upscaler recipe needs the shapes data (it renders each scene at both sizes); "
                         f"data.kind must be \"shapes\", not {cfg.data['kind']!r}")
    vae, _ = load_vae(s.model or DEFAULT_MODEL)
    vae = vae.float().requires_grad_(False)
    inputs, targets = training_pairs(cfg, s, vae, progress)
    del vae
    torch.manual_seed(cfg.seed)
    net = CompactUpscaler(UpscalerConfig(num_feat=s.num_feat, num_conv=s.num_conv, scale=s.scale))
    init_weights(net)
    out = Path(cfg.out)

    def loss_fn(step, micro):
        rng = random.Random(f"{cfg.seed}:{step}:{micro}")
        x, y = _crops(inputs, targets, [rng.randrange(len(inputs)) for _ in range(cfg.batch_size)], s, rng)
        pred = net(x).float()
        weights = object_weights(y * 2 - 1, s.object_weight) if s.object_weight != 1 else None
        loss = weighted_l1(pred, y, weights) if s.loss == "l1" else weighted_mse(pred, y, weights)
        return loss + s.edge_weight * gradient_l1(pred, y) if s.edge_weight else loss

    def export(step, weights):
        meta = {"plainsd.recipe": json.dumps(dataclasses.asdict(cfg)), "plainsd.data_seed": str(cfg.data.get("seed", 0)),
                "plainsd.steps": str(step), "plainsd.upscaler_config": json.dumps(dataclasses.asdict(net.config))}
        dtype = torch.float16 if s.fp16 else torch.float32
        write_safetensors({k: v.to(dtype) for k, v in weights.items()}, out / "upscaler.safetensors", meta)

    def sample(step, weights):
        x, y = to_unit(inputs[-4:]), to_unit(targets[-4:])
        with _swapped(net, weights), torch.no_grad():
            pred = net(x).clamp(0, 1)
        lanczos = torch.cat([to_tensor(p.resize(y.shape[-2:], Image.LANCZOS)) for p in to_pil(x * 2 - 1)])
        (out / "samples").mkdir(exist_ok=True)
        contact_sheet(to_pil(torch.cat([lanczos, pred * 2 - 1, y * 2 - 1])), columns=4).save(out / "samples" / f"upscaler-{step:06d}.png")

    net.train()
    return train(cfg, _named(net), loss_fn, resume, sample, export, progress)
