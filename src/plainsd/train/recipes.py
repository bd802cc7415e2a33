"""The three trainings of Stable Diffusion, as the paper stages them, on small configs.

1. vae:  the autoencoder, on images: reconstruction (L1) + a small KL term. With data "shapes": "all" it
         also sees the held-out shapes (heart, star); the shipped VAE was trained without them, and still
         gives back large hearts (the shape the fine-tuning recipes teach).
2. clip: text and image towers, contrastively: cosine similarities, symmetric cross-entropy over the
         batch's other pairs, learned temperature (Radford et al. 2021). In random batches of this world
         the colours, positions and backgrounds already tell the pairs apart, and both towers learned to
         ignore the shape (captions differing only in the shape word came out nearly identical): neither tower
         gains from seeing the shape while the other ignores it. extra.hard_negatives fills part of each
         batch with groups of scenes that differ in one attribute (extra.vary), with every caption's
         positives marked (a caption that leaves the size out fits both sizes), and the towers then learn it.
3. unet: the noise predictor on frozen VAE latents and frozen CLIP text states: random timestep, noise
         added by the forward process, MSE on the predicted noise, some captions left empty so that
         classifier-free guidance works (Rombach et al. 2022; Ho & Salimans 2022). extra.snr_gamma
         weights each sample's loss by Min-SNR-gamma (see diffusion.denoisers.training_loss).

And for a trained model, a ControlNet (Zhang, Rao & Agrawala 2023): a copy of its UNet's way down that reads a
hint image (an edge map) and steers the frozen UNet through zero-initialised convolutions; and an LCM-LoRA that
draws in a few steps (lcm.py).

Each writes its networks into its run folder; the unet recipe writes the whole model as one original-
layout checkpoint (model.safetensors) that plainsd.load reads. A recipe's own settings (its config's "extra")
are the dataclass above its function; settings(cfg) reads them for any recipe.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..config import ModelConfig, TextConfig, UNetConfig, VAEConfig, VisionConfig
from ..diffusion import schedules
from ..diffusion.denoisers import training_loss
from ..images import contact_sheet, to_pil, to_tensor
from ..models import StableDiffusion
from ..models.clip import CLIPTextModel, CLIPVisionModel
from ..models.tokenizer import Tokenizer
from ..models.vae import AutoencoderKL
from ..weights import save, write_safetensors
from . import dist
from .data import ALL_SHAPES, SHAPES, VARY, FolderDataset, ShapesDataset, hard_negative_batch
from .captioner import CaptionerSettings, train_captioner
from .lcm import LCMSettings, train_lcm
from .upscaler import UpscalerSettings, train_upscaler
from .loop import TrainConfig, train
from .settings import RecipeSettings

# The small Stable Diffusion that plainsd trains and ships: same classes and layout as SD 1.x.
# GroupNorm with one channel per group normalises away each channel's mean, and with it an image's
# colour, right before the output layer: the small networks keep SD's 4+ channels per group instead.
BASE_MODEL = ModelConfig(
    text=TextConfig(width=64, layers=3, heads=2, projection_dim=64),
    unet=UNetConfig(model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1, attention_levels=(0, 1, 2),
                    num_heads=4, context_dim=64, norm_groups=16),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, norm_groups=8),
    resolution=64,
)
BASE_VISION = VisionConfig(image_size=64, patch_size=8, width=96, layers=3, heads=2, projection_dim=64)


def model_config(cfg: TrainConfig) -> ModelConfig:
    base = dataclasses.asdict(BASE_MODEL)
    for part, values in cfg.model.items():
        if part in ("text", "unet", "vae"):
            base[part].update(values)
        elif part != "vision":
            base[part] = values
    return ModelConfig.from_dict(base)


def vision_config(cfg: TrainConfig) -> VisionConfig:
    return VisionConfig(**{**dataclasses.asdict(BASE_VISION), **cfg.model.get("vision", {})})


def dataset(cfg: TrainConfig, size: int):
    data = dict(cfg.data)
    kind = data.pop("kind", "shapes")
    if kind == "shapes":
        shapes = data.get("shapes", "base")
        shapes = {"base": SHAPES, "all": ALL_SHAPES}.get(shapes, shapes) if isinstance(shapes, str) else shapes
        return ShapesDataset(length=data.get("length", 1_000_000), seed=data.get("seed", 0), size=size,
                             shapes=tuple(shapes))
    if kind == "folder":
        return FolderDataset(data["path"], size=size)
    raise ValueError(f"unknown data kind {kind!r}; known: shapes, folder")


def batch(ds, cfg: TrainConfig, step: int, micro: int) -> tuple[torch.Tensor, list[str]]:
    """The micro-batch of a step: a pure function of (seed, step, micro)."""
    rng = random.Random(f"{cfg.seed}:{step}:{micro}")
    items = [ds[rng.randrange(len(ds))] for _ in range(cfg.batch_size)]
    return torch.cat([to_tensor(im) for im, _, _ in items]), [c for _, c, _ in items]


def _named(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Parameter]:
    return {prefix + k: p for k, p in module.named_parameters()}


def _metadata(path: str | Path) -> dict:
    """The safetensors header's metadata; {} for anything else (weights.load then says what is wrong)."""
    try:
        return safe_open(str(path), framework="pt").metadata() or {}
    except Exception:
        return {}


def _load_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    f = safe_open(str(path), framework="pt")
    return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


# --- 1. the autoencoder --------------------------------------------------------------------------------

@dataclass
class VAESettings(RecipeSettings):
    recipe: ClassVar[str] = "vae"
    kl_weight: float = 1e-6       # the KL term's weight (summed per sample, divided by the pixels, as latent diffusion)
    object_weight: float = 1.0    # the objects' pixels weigh this many times the background's in the L1 (object_weights)


def train_vae(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    s = VAESettings.from_extra(cfg.extra)
    mc = model_config(cfg)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(mc.vae)
    ds = dataset(cfg, mc.resolution)
    out = Path(cfg.out)

    def loss_fn(step, micro):
        x, _ = batch(ds, cfg, step, micro)
        rows = dist.rows(len(x))
        posterior = vae.encode(dist.take(rows, x))
        g = torch.Generator().manual_seed(step * 131 + micro)
        recon = vae.decode(posterior_rows(posterior, g, len(x), rows))
        # L1 per pixel (the objects' pixels weighted extra.object_weight times, see object_weights), plus the KL
        # summed per sample and scaled as latent diffusion does (per pixel).
        weights = object_weights(x, s.object_weight) if s.object_weight != 1 else None
        return (weighted_l1(recon.float(), dist.take(rows, x), weights, rows) +
                s.kl_weight * posterior.kl().float().mean() / x[0].numel())

    def export(step, weights):
        state = {("first_stage_model." + k): v for k, v in weights.items()}
        scale = latent_scale(vae, weights, ds, cfg)
        meta = {"plainsd.vae_config": json.dumps(dataclasses.asdict(mc.vae)), "plainsd.scale_factor": str(scale)}
        write_safetensors(state, out / "vae.safetensors", meta)

    def sample(step, weights):
        x, _ = batch(ds, dataclasses.replace(cfg, batch_size=8, seed=cfg.seed + 999), 0, 0)
        with _swapped(vae, weights), torch.no_grad():
            recon = vae.decode(vae.encode(x).mode())
        (out / "samples").mkdir(exist_ok=True)
        contact_sheet(to_pil(torch.cat([x, recon]))).save(out / "samples" / f"vae-{step:06d}.png")

    return train(cfg, _named(vae), loss_fn, resume, sample, export, progress)


def object_weights(images: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): `weight` on the pixels of objects, 1 on the background.

    The background is each image's median border colour (as the judge reads it); a pixel belongs to an object
    when some channel differs from it by more than `threshold` (images in [-1, 1]). A small shape covers 2% of
    a 64x64 picture, so a plain per-pixel loss is almost all background and lets the decoder round off
    a small diamond's corners; weighting the objects makes their edges count."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    on_object = (images - background).abs().amax(dim=1, keepdim=True) > threshold
    return 1 + (weight - 1) * on_object.float()


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                rows: slice | None = None) -> torch.Tensor:
    """L1 averaged with per-pixel weights (plain L1 for None). With rows, pred and target are those rows of a
    batch (one process's share), weights the whole batch's: normalised over it, as training_loss does."""
    if weights is None:
        return F.l1_loss(pred, target)
    if rows is None:
        return ((pred - target).abs() * weights).sum() / (weights.sum() * pred.shape[1])
    share = weights.sum() * len(pred) / len(weights)
    return ((pred - target).abs() * weights[rows]).sum() / (share * pred.shape[1])


@dataclass
class DecoderSettings(RecipeSettings):
    """What the recipes that train a decoder on a trained VAE's cached latents share."""
    vae: str | None = None        # the file the vae training wrote (required): its encoder gives the latents
    latent_cache: int = 4096      # images whose posteriors are encoded once and trained on
    object_weight: float = 1.0    # the objects' pixels weigh this many times the background's in the L1 (object_weights)

    def check(self):
        if not self.vae:
            raise ValueError(f"the {self.recipe} recipe needs extra.vae: the file the vae training wrote")
        if self.latent_cache < 1:
            raise ValueError(f"extra.latent_cache of the {self.recipe} recipe must be at least 1 (it trains on cached "
                             f"latents), not {self.latent_cache}")


@dataclass
class VAEDecoderSettings(DecoderSettings):
    """The VAE's own decoder, trained on; its encoder stays."""
    recipe: ClassVar[str] = "vae-decoder"
    latent_noise: float = 0.0     # the most noise added to a sample's latents, in the UNet's units (see train_vae_decoder)

    def check(self):
        super().check()
        if self.latent_noise < 0:
            raise ValueError(f"extra.latent_noise must be >= 0 (a standard deviation in the UNet's units), not {self.latent_noise}")


def train_vae_decoder(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune a trained VAE's decoder with its encoder frozen, as Stability's ft-EMA / ft-MSE VAEs did for SD:
    the latent space stays the same (a UNet trained on it needs no retraining), only the pictures drawn from
    it get better. From the frozen encoder's latents (cached, sampled from the posterior) back to the images; L1,
    with extra.object_weight (default 1: plain L1) times more weight on the objects' pixels (see object_weights).

    extra.latent_noise (default 0) adds Gaussian noise to each sample's latents, its standard deviation drawn
    uniformly from [0, latent_noise] in the UNet's units (latents times the scale factor, unit variance): the
    decoder learns to draw the right picture from latents that are a little off, as a UNet's are. On the shapes
    world it made clean round trips worse, and the UNet's pictures with them, so the shipped recipes leave it at 0."""
    s = VAEDecoderSettings.from_extra(cfg.extra)
    vae, scale = load_vae(s.vae)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    mc = dataclasses.replace(model_config(cfg), vae=vae.config)
    ds = dataset(cfg, mc.resolution)
    out = Path(cfg.out)
    kept: list[torch.Tensor] = []
    cache = _latent_cache(vae, ds, s.latent_cache, progress, keep_images=kept)
    images = torch.cat(kept)
    trained = {k: p for k, p in _named(vae).items() if p.requires_grad}

    def loss_fn(step, micro):
        rng = random.Random(f"{cfg.seed}:{step}:{micro}")
        idx = [rng.randrange(len(images)) for _ in range(cfg.batch_size)]
        g = torch.Generator().manual_seed(step * 131 + micro)
        z = sample_posterior(cache[0][idx], cache[1][idx], g, s.latent_noise / scale)
        weights = object_weights(images[idx], s.object_weight) if s.object_weight != 1 else None
        rows = dist.rows(len(idx))
        return weighted_l1(vae.decode(dist.take(rows, z)).float(), dist.take(rows, images[idx]), weights, rows)

    def export(step, weights):
        with _swapped(vae, weights):
            state = {("first_stage_model." + k): v for k, v in vae.state_dict().items()}
        meta = {"plainsd.vae_config": json.dumps(dataclasses.asdict(vae.config)), "plainsd.scale_factor": str(scale)}
        write_safetensors(state, out / "vae.safetensors", meta)

    def sample(step, weights):
        with _swapped(vae, weights), torch.no_grad():
            recon = vae.decode(cache[0][:8])
        (out / "samples").mkdir(exist_ok=True)
        contact_sheet(to_pil(torch.cat([images[:8], recon.clamp(-1, 1)]))).save(out / "samples" / f"vae-decoder-{step:06d}.png")

    return train(cfg, trained, loss_fn, resume, sample, export, progress)


def posterior_rows(posterior, g: torch.Generator, n: int, rows: slice | None) -> torch.Tensor:
    """A sample of the posterior of `rows` of a batch of n (dist.rows; None: the whole batch), with the noise
    drawn for all n, so that each row gets the same numbers whatever the split."""
    if rows is None:
        return posterior.sample(g)
    noise = torch.randn((n, *posterior.mean.shape[1:]), generator=g, dtype=posterior.mean.dtype)
    return posterior.mean + posterior.std * noise[rows]


def sample_posterior(mean: torch.Tensor, std: torch.Tensor, g: torch.Generator, max_noise: float = 0.0) -> torch.Tensor:
    """A sample of the VAE's posterior (mean + std * e) from cached means and stds, plus, for max_noise > 0,
    Gaussian noise whose standard deviation is drawn per sample uniformly from [0, max_noise] (in the latents'
    own units)."""
    z = mean + std * torch.randn(mean.shape, generator=g)
    if max_noise:
        sigma = torch.rand(len(mean), *[1] * (mean.dim() - 1), generator=g) * max_noise
        z = z + sigma * torch.randn(mean.shape, generator=g)
    return z


def check_latent_scale(name: str, model_scale: float, vae_scale: float) -> None:
    """Refuse a checkpoint (extra.`name`) whose latent scale is not extra.vae's: what it learned is for another
    encoder's latents."""
    if abs(model_scale - vae_scale) > 1e-4 * vae_scale:
        raise ValueError(f"extra.{name}'s latent scale ({model_scale}) is not extra.vae's ({vae_scale}): "
                         "they must share the VAE encoder")


class _swapped:
    """Temporarily load exported (e.g. EMA) weights into a module."""

    def __init__(self, module, weights):
        self.module, self.weights = module, weights

    def __enter__(self):
        self.saved = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict({k: v.to(self.saved[k].dtype) for k, v in self.weights.items()}, strict=False)

    def __exit__(self, *exc):
        self.module.load_state_dict(self.saved)


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, weights: dict, ds, cfg: TrainConfig, n: int = 256) -> float:
    """1 / std of the latents, so that the UNet sees unit-variance latents (SD's 0.18215 was found so)."""
    with _swapped(vae, weights):
        x, _ = batch(ds, dataclasses.replace(cfg, batch_size=n, seed=cfg.seed + 12345), 0, 0)
        z = vae.encode(x).sample(torch.Generator().manual_seed(0))
    return float(1.0 / z.std())


# --- 2. CLIP ------------------------------------------------------------------------------------------

@dataclass
class CLIPSettings(RecipeSettings):
    recipe: ClassVar[str] = "clip"
    hard_negatives: float = 0.0   # share of each batch filled with groups of scenes that differ in one attribute
    group: int = 4                # scenes per hard-negative group: one, then variants of it
    vary: tuple[str, ...] = VARY  # what a variant changes, drawn from this list (repeat one to weight it)

    def check(self):
        hard, group, vary = self.hard_negatives, self.group, self.vary
        if hard and not (0 < hard <= 1 and group >= 2 and vary and set(vary) <= set(VARY)):
            raise ValueError(f"extra.hard_negatives must be a fraction of the batch in (0, 1], extra.group at least 2 "
                             f"and extra.vary a list of {', '.join(VARY)}; got {hard}, {group}, {list(vary)}")


def train_clip(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    s = CLIPSettings.from_extra(cfg.extra)
    mc = model_config(cfg)
    torch.manual_seed(cfg.seed)
    text, vision = CLIPTextModel(mc.text), CLIPVisionModel(vision_config(cfg))
    logit_scale = torch.nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07), CLIP's initial temperature
    tokenizer = Tokenizer("sd1" if mc.text.pad == "eot" else "sd2")
    ds = dataset(cfg, mc.resolution)
    out = Path(cfg.out)
    params = {**_named(text, "text."), **_named(vision, "vision."), "logit_scale": logit_scale}
    if s.hard_negatives and not isinstance(ds, ShapesDataset):
        raise ValueError("extra.hard_negatives needs the shapes data (it draws variants of a scene); "
                         "leave it out for a folder of images")

    def loss_fn(step, micro):
        if s.hard_negatives:
            images, captions, target = hard_negative_batch(ds, cfg, step, micro, s.hard_negatives, s.group, s.vary)
        else:
            images, captions = batch(ds, cfg, step, micro)
            target = torch.eye(len(captions))
        rows = dist.rows(len(captions))  # each process encodes its rows; the logits compare them with all
        t = dist.gather(F.normalize(text.pooled(tokenizer(dist.take(rows, captions))).float(), dim=-1))
        v = dist.gather(F.normalize(vision(dist.take(rows, images)).float(), dim=-1))
        logits = logit_scale.clamp(max=4.6052).exp() * t @ v.T  # temperature capped at 100, as CLIP
        # cross-entropy against the images each caption fits (the diagonal, and any other image that shows
        # every attribute the caption states) and the captions each image fits
        return (F.cross_entropy(logits, target / target.sum(1, keepdim=True)) +
                F.cross_entropy(logits.T, target.T / target.T.sum(1, keepdim=True))) / 2

    def export(step, weights):
        state = {("cond_stage_model.transformer." + k[5:]): v for k, v in weights.items() if k.startswith("text.")}
        state.update({("clip_vision." + k[7:]): v for k, v in weights.items() if k.startswith("vision.")})
        state["clip_logit_scale"] = weights["logit_scale"].reshape(1)
        meta = {"plainsd.text_config": json.dumps(dataclasses.asdict(mc.text)),
                "plainsd.vision_config": json.dumps(dataclasses.asdict(vision_config(cfg)))}
        write_safetensors(state, out / "clip.safetensors", meta)

    return train(cfg, params, loss_fn, resume, None, export, progress)


def load_clip(path: str | Path) -> tuple[CLIPTextModel, CLIPVisionModel, float]:
    meta = _metadata(path)
    if "plainsd.vision_config" not in meta:
        raise ValueError(f"{path} is not a CLIP written by `plainsd train clip` (it has no image tower)")
    f = safe_open(str(path), framework="pt")
    text = CLIPTextModel(TextConfig(**_tuples(json.loads(meta["plainsd.text_config"]))))
    vision = CLIPVisionModel(VisionConfig(**json.loads(meta["plainsd.vision_config"])))
    text.load_state_dict(_load_prefixed(Path(path), "cond_stage_model.transformer."))
    vision.load_state_dict(_load_prefixed(Path(path), "clip_vision."))
    return text.eval(), vision.eval(), float(f.get_tensor("clip_logit_scale")[0].exp())


def load_vae(path: str | Path) -> tuple[AutoencoderKL, float]:
    """A VAE written by `plainsd train vae`, or the VAE inside a whole model checkpoint."""
    meta = _metadata(path)
    if "plainsd.vae_config" not in meta:
        from ..weights import load

        sd = load(path)
        return sd.vae.eval(), sd.config.scale_factor
    vae = AutoencoderKL(VAEConfig(**_tuples(json.loads(meta["plainsd.vae_config"]))))
    vae.load_state_dict(_load_prefixed(Path(path), "first_stage_model."))
    return vae.eval(), float(meta["plainsd.scale_factor"])


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# --- 3. the UNet --------------------------------------------------------------------------------------

SAMPLE_PROMPTS = ["a red circle on the left", "a large blue square", "a small yellow triangle at the top",
                  "a green cross on the right", "a white diamond in the centre on a black background",
                  "a purple circle at the bottom", "a red square on the left and a blue circle on the right",
                  "an orange triangle"]


@dataclass
class UNetSettings(RecipeSettings):
    recipe: ClassVar[str] = "unet"
    vae: str | None = None        # the vae training's file (required): the frozen encoder whose latents the UNet learns
    clip: str | None = None       # the clip training's file: the frozen text encoder (required unless init)
    init: str | None = None       # a whole checkpoint to go on training (its UNet and text encoder), in place of clip
    empty_caption: float = 0.1    # share of captions left empty, so that classifier-free guidance works
    latent_cache: int = 0         # images whose posteriors are encoded once and trained on; 0: encode every batch
    object_weight: float = 1.0    # the latent pixels an object touches weigh this much in the loss (needs latent_cache)
    snr_gamma: float | None = None  # Min-SNR-gamma loss weights (diffusion.denoisers.training_loss); None: plain MSE
    fp16: bool = True             # export model.safetensors in float16

    def check(self):
        gamma = self.snr_gamma
        if gamma is not None and gamma <= 0:
            raise ValueError(f"extra.snr_gamma must be a positive number (5 is the usual value), got {gamma!r}")
        if not self.vae or not (self.clip or self.init):
            raise ValueError("the unet recipe needs extra.vae and extra.clip: the files the vae and clip trainings "
                             "wrote (or extra.init, a whole checkpoint to go on training, in place of extra.clip)")
        if self.object_weight != 1 and not self.latent_cache:
            raise ValueError("extra.object_weight in the unet recipe needs extra.latent_cache")


def train_unet(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    s = UNetSettings.from_extra(cfg.extra)
    sd, scale = _unet_model(cfg, s)
    mc = sd.config
    ds = dataset(cfg, mc.resolution)
    out = Path(cfg.out)
    kept: list[torch.Tensor] | None = [] if s.object_weight != 1 else None
    cache = _latent_cache(sd.vae, ds, s.latent_cache, progress, keep_images=kept)
    latent_weights = None
    if kept is not None:  # the objects' latent pixels (any the object touches) weigh object_weight in the loss
        f = mc.resolution // cache[0].shape[-1]
        latent_weights = torch.cat([F.max_pool2d(object_weights(im, s.object_weight), f) for im in kept])
        del kept

    def loss_fn(step, micro):
        g = torch.Generator().manual_seed(step * 7919 + micro)
        rows = dist.rows(cfg.batch_size)
        if cache is not None:  # the frozen VAE's posteriors, computed once
            rng = random.Random(f"{cfg.seed}:{step}:{micro}")
            idx = [rng.randrange(len(cache[2])) for _ in range(cfg.batch_size)]
            latents = sample_posterior(cache[0][idx], cache[1][idx], g) * scale
            captions = [cache[2][i] for i in idx]
            weights = latent_weights[idx] if latent_weights is not None else None
        else:
            weights = None
            images, captions = batch(ds, cfg, step, micro)
            with torch.no_grad():  # each process encodes its rows; the UNet's loss needs the whole batch's
                latents = dist.gather(posterior_rows(sd.vae.encode(dist.take(rows, images)), g, len(images), rows))
                latents = latents * scale
        rng = random.Random(f"empty:{cfg.seed}:{step}:{micro}")
        captions = ["" if rng.random() < s.empty_caption else c for c in captions]
        with torch.no_grad():
            context = sd.text_encoder(sd.tokenizer(captions))
        return training_loss(sd.unet, latents, context, mc.prediction, generator=g, weights=weights,
                             snr_gamma=s.snr_gamma, rows=rows)

    def export(step, weights):
        with _swapped(sd.unet, {k[5:]: v for k, v in weights.items()}):
            save(sd, out / "model.safetensors", dtype=torch.float16 if s.fp16 else None)

    def sample(step, weights):
        from ..pipeline import txt2img  # the public API, as a user would call it

        with _swapped(sd.unet, {k[5:]: v for k, v in weights.items()}):
            sd.eval()
            pics = [txt2img(sd, p, steps=20, cfg_scale=5.0, seed=i).images[0] for i, p in enumerate(SAMPLE_PROMPTS)]
            sd.train()
        (out / "samples").mkdir(exist_ok=True)
        contact_sheet(pics).save(out / "samples" / f"unet-{step:06d}.png")

    sd.unet.train()
    return train(cfg, _named(sd.unet, "unet."), loss_fn, resume, sample, export, progress)


def _unet_model(cfg: TrainConfig, s: UNetSettings) -> tuple[StableDiffusion, float]:
    """The model whose UNet the unet recipe trains, and the latent scale: a new UNet beside the trained VAE and
    CLIP text tower, or a whole checkpoint's (extra.init) to go on training; only the UNet is trainable."""
    vae, scale = load_vae(s.vae)
    torch.manual_seed(cfg.seed)
    if s.init:  # go on training a whole checkpoint's UNet, with its text encoder
        from ..weights import load

        sd = load(s.init, dtype=torch.float32)
        check_latent_scale("init", sd.config.scale_factor, scale)
    else:
        text, _, _ = load_clip(s.clip)
        mc = dataclasses.replace(model_config(cfg), vae=vae.config, text=text.config, scale_factor=scale)
        sd = StableDiffusion(mc)
        sd.text_encoder.load_state_dict(text.state_dict())
    sd.vae.load_state_dict(vae.state_dict())
    sd.unet.requires_grad_(True)  # (a loaded checkpoint comes frozen, for inference)
    sd.vae.requires_grad_(False)
    sd.text_encoder.requires_grad_(False)
    return sd, scale


@torch.no_grad()
def _latent_cache(vae: AutoencoderKL, ds, n: int, progress: bool, keep_images: list | None = None):
    """(means, stds, captions) of the first n images of the data set, or None for n = 0; keep_images
    collects the image tensors too."""
    if not n:
        return None
    from tqdm.auto import tqdm

    means, stds, captions = [], [], []
    for start in tqdm(range(0, min(n, len(ds)), 64), desc="encoding latents", disable=not progress):
        items = [ds[i] for i in range(start, min(start + 64, n, len(ds)))]
        images = torch.cat([to_tensor(im) for im, _, _ in items])
        if keep_images is not None:
            keep_images.append(images)
        post = vae.encode(images)
        means.append(post.mean)
        stds.append(post.std)
        captions += [c for _, c, _ in items]
    return torch.cat(means), torch.cat(stds), captions


@torch.no_grad()
def generated_latents(sd: StableDiffusion, captions: list[str], seed: int, steps: int = 20, cfg_scale: float = 5.0,
                      batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """What the model's sampler hands to the decoder (scaled latents) for these captions: DPM++ 2M Karras, CFG,
    caption i with seed + i (txt2img's latents for that prompt and seed), many captions per batch."""
    from tqdm.auto import tqdm

    from ..diffusion import samplers
    from ..diffusion.denoisers import DiscreteDenoiser
    from ..diffusion.guidance import CFGDenoiser
    from ..prompts import encode_pair

    denoiser = DiscreteDenoiser(lambda x, t, cond: sd.unet(x, t, cond), sd.config.prediction)
    sigmas = denoiser.get_sigmas(steps, "karras")
    guided = CFGDenoiser(denoiser, cfg_scale, sigmas)
    f, res = sd.config.vae.factor, sd.config.resolution
    out = []
    for start in tqdm(range(0, len(captions), batch_size), desc="generating latents", disable=not progress):
        chunk = captions[start:start + batch_size]
        x = torch.stack([torch.randn(sd.config.unet.in_channels, res // f, res // f,  # txt2img's noise for seed + i
                                     generator=torch.Generator().manual_seed(seed + start + i)) for i in range(len(chunk))])
        x = x * sigmas[0]
        cond, uncond = encode_pair(sd.tokenizer, sd.text_encoder, chunk, [""] * len(chunk))  # as txt2img encodes them
        extra = {"cond": cond, "uncond": uncond}
        out.append(samplers.sample_dpmpp_2m(guided, x, sigmas, extra_args=extra, disable=True).float())
    return torch.cat(out)


@dataclass
class TAESDSettings(DecoderSettings):
    """A tiny decoder (fast mode's) for the VAE (or whole checkpoint) in vae."""
    recipe: ClassVar[str] = "taesd"
    width: int = 64               # the tiny decoder's channels
    model: str | None = None      # a whole checkpoint with this VAE, whose sampler draws the generated latents
    generated: int = 0            # captions the model draws latents for: half of each batch (0: none)

    def check(self):
        super().check()
        if self.generated and not self.model:
            raise ValueError("extra.generated needs extra.model: the checkpoint whose sampler makes the latents")


def train_taesd(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Fast mode's tiny decoder (TAESD's architecture) for a trained VAE: from the VAE encoder's latents,
    as the UNet sees them (times the scale factor), back to the images, in [0, 1]; L1 loss.

    With extra.model (a whole checkpoint with this VAE) and extra.generated = N, half of each batch is instead
    latents the model's sampler produced for N captions, with the VAE decoder's pictures of them as the target:
    the sampler's latents are not quite the encoder's (a flat background comes out slightly off the encoder's
    values), and a decoder that only saw the encoder's latents paints such backgrounds in blotches.
    extra.object_weight weights the objects' pixels as in the vae-decoder recipe."""
    from ..models.taesd import TinyDecoder

    s = TAESDSettings.from_extra(cfg.extra)
    vae, scale = load_vae(s.vae)
    vae.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    decoder = TinyDecoder(vae.config.z_channels, s.width)
    ds = dataset(cfg, model_config(cfg).resolution)
    out = Path(cfg.out)
    kept: list[torch.Tensor] = []
    cache = _latent_cache(vae, ds, s.latent_cache, progress, keep_images=kept)
    images = torch.cat(kept)
    generated, targets = _generated_pairs(s, vae, scale, ds, cfg.seed + 7, progress) if s.generated else (None, None)

    def weights_of(pictures):  # pictures in [0, 1]
        return object_weights(pictures * 2 - 1, s.object_weight) if s.object_weight != 1 else None

    def loss_fn(step, micro):
        rng = random.Random(f"{cfg.seed}:{step}:{micro}")
        n_gen = cfg.batch_size // 2 if generated is not None else 0
        idx = [rng.randrange(len(images)) for _ in range(cfg.batch_size - n_gen)]
        g = torch.Generator().manual_seed(step * 31 + micro)
        latents = sample_posterior(cache[0][idx], cache[1][idx], g) * scale
        target = (images[idx] + 1) / 2
        rows = dist.rows(len(idx))
        loss = weighted_l1(decoder(dist.take(rows, latents)).float(), dist.take(rows, target), weights_of(target), rows)
        if n_gen:
            gi = [rng.randrange(len(generated)) for _ in range(n_gen)]
            rows = dist.rows(n_gen)
            loss = (loss + weighted_l1(decoder(dist.take(rows, generated[gi])).float(), dist.take(rows, targets[gi]),
                                       weights_of(targets[gi]), rows)) / 2
        return loss

    def export(step, weights):
        meta = {"plainsd.taesd_width": str(decoder.width), "plainsd.scale_factor": str(scale)}
        write_safetensors({k: v.half() for k, v in weights.items()}, out / "taesd.safetensors", meta)

    def sample(step, weights):
        with _swapped(decoder, weights), torch.no_grad():
            pics = decoder(cache[0][:8] * scale) * 2 - 1
        (out / "samples").mkdir(exist_ok=True)
        contact_sheet(to_pil(torch.cat([images[:8], pics.clamp(-1, 1)]))).save(out / "samples" / f"taesd-{step:06d}.png")

    return train(cfg, _named(decoder), loss_fn, resume, sample, export, progress)


def _generated_pairs(s: TAESDSettings, vae: AutoencoderKL, scale: float, ds, seed: int,
                     progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The taesd recipe's generated half: latents extra.model's sampler draws for extra.generated captions (not
    the encoded images' captions), and the VAE decoder's pictures of them in [0, 1] as the targets."""
    from ..weights import load

    sd = load(s.model).eval()
    check_latent_scale("model", sd.config.scale_factor, scale)
    captions = [ds[len(ds) - 1 - i][1] for i in range(s.generated)]
    generated = generated_latents(sd, captions, seed, progress=progress)
    with torch.no_grad():
        targets = torch.cat([(vae.decode(z / scale).clamp(-1, 1) + 1) / 2 for z in generated.split(64)])
    return generated, targets


# --- 4. ControlNet --------------------------------------------------------------------------------------

HINT_RESOLUTIONS = (64, 128, 256, 512)  # the processor resolutions the hints are made at (see control_hint)


@dataclass
class ControlNetSettings(RecipeSettings):
    """A ControlNet for a trained model, as the paper trains one: its UNet, VAE and text encoder frozen."""
    recipe: ClassVar[str] = "controlnet"
    base: str | None = None       # the whole checkpoint whose UNet the ControlNet steers; None: the shipped model
    hint: str = "canny"           # the preprocessor (detectors) that turns each training picture into its hint
    empty_caption: float = 0.5    # share of captions left empty (the paper's half: it must work without a prompt)
    colour_caption: float = 0.0   # share of the other captions naming only the objects' colours ("a red"): the
                                  # prompt that leaves the whole layout to the edges (shapes data only)
    shapeless_caption: float = 0.0  # share of the other captions with their shape words left out ("a red on the
                                    # left"), so that the ControlNet learns to supply what the text does not say
    contradicting_caption: float = 0.0  # share of the rest with each shape word swapped for another shape ("a red
                                    # square" over a circle's edges), so that the edges learn to outweigh the text
    timesteps: str = "uniform"    # "uniform", or "cubic": more of the noisy timesteps, where the layout is decided
                                  # (schedules.sample_timesteps)
    init: str | None = None       # a ControlNet file to go on training from; None: the copy of the base UNet
    latent_cache: int = 16384     # pictures whose posteriors and hints are computed once and trained on
    fp16: bool = True             # export controlnet.safetensors in float16

    def check(self):
        if self.hint not in CONTROL_HINTS:
            raise ValueError(f"extra.hint {self.hint!r} of the controlnet recipe is not one it can make; "
                             f"known: {', '.join(CONTROL_HINTS)}")
        if self.latent_cache < 1:
            raise ValueError(f"extra.latent_cache of the controlnet recipe must be at least 1 (it trains on cached "
                             f"latents and hints), not {self.latent_cache}")
        for name in ("empty_caption", "colour_caption", "shapeless_caption", "contradicting_caption"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"extra.{name} must be a fraction in [0, 1], not {getattr(self, name)}")
        if self.timesteps not in ("uniform", "cubic"):
            raise ValueError(f"extra.timesteps of the controlnet recipe is 'uniform' or 'cubic', not {self.timesteps!r}")


CONTROL_HINTS = ("canny",)


def control_hint(image, hint: str, resolution: int) -> torch.Tensor:
    """The hint [1, 3, H, W] in [0, 1] for a training picture of H x W, made as A1111's ControlNet extension
    makes it from a control picture: the preprocessor at the processor resolution (detectors.detect), the map
    then brought to the picture's size (detectors.fit, Crop and Resize). Hints made at several resolutions teach
    the ControlNet both pixel perfect's edges and the ones the default 512 gives once shrunk."""
    from .. import detectors

    hinted = detectors.fit(detectors.detect(hint, image, resolution), image.width, image.height, "Crop and Resize")
    return to_tensor(hinted) * 0.5 + 0.5


def train_controlnet(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """The ControlNet recipe (Zhang, Rao & Agrawala 2023): a trainable copy of the base UNet's time embedding,
    input blocks and middle block, whose zero convolutions (and the hint encoder's last convolution) start at
    zero, so that training starts from the base model exactly; the base UNet, VAE and text encoder stay frozen.
    The loss is the base UNet's noise-prediction loss with the ControlNet's residuals added to its skips; the
    captions are left empty, cut to their colours, stripped of their shape words or given wrong ones in the shares
    extra sets (_control_caption). Latents and hints of extra.latent_cache pictures are computed once; each
    picture's hint is made at one of HINT_RESOLUTIONS (control_hint)."""
    from ..models.controlnet import ControlNet

    s = ControlNetSettings.from_extra(cfg.extra)
    sd = _frozen_base(s.base)
    mc, scale = sd.config, sd.config.scale_factor
    torch.manual_seed(cfg.seed)
    controlnet = controlnet_from_unet(sd.unet, ControlNet)
    if s.init:
        from ..weights import load_controlnet
        controlnet.load_state_dict(load_controlnet(s.init).state_dict())
    ds = dataset(cfg, mc.resolution)
    if s.colour_caption and not hasattr(ds, "scene"):
        raise ValueError("extra.colour_caption needs the shapes data (data.kind 'shapes'), whose scenes name the "
                         "objects' colours")
    out = Path(cfg.out)
    cache, hints = _control_cache(sd.vae, ds, s, progress)
    colours = [_colours_only(ds.scene(i)) if s.colour_caption else "" for i in range(len(cache[2]))]

    def controlled(hint):
        def net(x, t, context):
            return sd.unet(x, t, context, control=controlnet(x, hint, t, context))
        return net

    def loss_fn(step, micro):
        g = torch.Generator().manual_seed(step * 7919 + micro)
        rng = random.Random(f"{cfg.seed}:{step}:{micro}")
        idx = [rng.randrange(len(cache[2])) for _ in range(cfg.batch_size)]
        latents = sample_posterior(cache[0][idx], cache[1][idx], g) * scale
        rng = random.Random(f"empty:{cfg.seed}:{step}:{micro}")
        captions = [_control_caption(cache[2][i], rng, s, colours[i]) for i in idx]
        with torch.no_grad():
            context = sd.text_encoder(sd.tokenizer(captions))
        rows = dist.rows(len(idx))
        timesteps = schedules.sample_timesteps(len(idx), g, s.timesteps)
        return training_loss(controlled(dist.take(rows, hints[idx]).float() / 255), latents, context, mc.prediction,
                             generator=g, timesteps=timesteps, rows=rows)

    def export(step, weights):
        from ..weights import save_controlnet

        with _swapped(controlnet, weights):
            save_controlnet(controlnet, out / "controlnet.safetensors", torch.float16 if s.fp16 else None,
                            {"plainsd.recipe": json.dumps(dataclasses.asdict(cfg)), "plainsd.hint": s.hint})

    def sample(step, weights):
        with _swapped(controlnet, weights):
            controlnet.eval()
            pics = _control_samples(sd, controlled, hints[:8].float() / 255, cache[2][:8])
            controlnet.train()
        (out / "samples").mkdir(exist_ok=True)
        contact_sheet(to_pil(torch.cat([hints[:8].float() / 127.5 - 1, pics]))).save(
            out / "samples" / f"controlnet-{step:06d}.png")

    controlnet.train()
    return train(cfg, _named(controlnet), loss_fn, resume, sample, export, progress)


def _control_caption(caption: str, rng: random.Random, s: ControlNetSettings, colours: str = "") -> str:
    """A training caption: empty for extra.empty_caption of them, the colours only (`colours`) for
    extra.colour_caption of the rest, without its shape words for extra.shapeless_caption of the rest after that,
    with other shapes' words for extra.contradicting_caption of the rest after that, else as written."""
    words = rf"\b({'|'.join(SHAPES)})\b"
    if rng.random() < s.empty_caption:
        return ""
    if s.colour_caption and rng.random() < s.colour_caption:
        return colours
    if rng.random() < s.shapeless_caption:
        return re.sub(rf"\s*{words}", "", caption)
    if s.contradicting_caption and rng.random() < s.contradicting_caption:
        return re.sub(words, lambda m: rng.choice([x for x in SHAPES if x != m.group(1)]), caption)
    return caption


def _colours_only(scene) -> str:
    """"a red", or "a red and a blue": the scene's objects by colour alone."""
    return " and ".join(f"a {o.colour}" for o in scene.objects)


def _frozen_base(path: str | None) -> StableDiffusion:
    from ..weights import load

    sd = load(path, dtype=torch.float32)
    sd.requires_grad_(False)
    return sd.eval()


def controlnet_from_unet(unet, controlnet_class):
    """A new ControlNet for this UNet: its time embedding (and SDXL's label_emb), input blocks and middle block
    copied from the UNet (every one of their tensors, strictly), the hint encoder random but for its zeroed last
    convolution, and the zero convolutions at zero.

    The hint encoder's other convolutions start with He initialisation (variance kept through each ReLU-like
    layer): with PyTorch's default, which shrinks a signal about threefold per layer, a sparse edge map reached its
    last convolution a thousandfold weaker, and the ControlNet learnt to ignore the hint."""
    controlnet = controlnet_class(unet.config)
    convs = [m for m in controlnet.input_hint_block if isinstance(m, torch.nn.Conv2d)]
    for conv in convs[:-1]:
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)
    copied = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
    own = controlnet.state_dict()
    state = {k: v for k, v in unet.state_dict().items() if k.startswith(copied)}
    missing = [k for k in own if k.startswith(copied) and k not in state]
    wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if missing or wrong:
        raise ValueError(f"the UNet does not match its ControlNet copy: missing {missing[:3]}, differing {wrong[:3]}")
    controlnet.load_state_dict({**own, **state})
    controlnet.requires_grad_(True)
    return controlnet


@torch.no_grad()
def _control_cache(vae: AutoencoderKL, ds, s: ControlNetSettings, progress: bool):
    """((means, stds, captions), hints as uint8 [N, 3, H, W]) of the first extra.latent_cache pictures; picture i's
    hint is made at HINT_RESOLUTIONS[i % 4]."""
    kept: list[torch.Tensor] = []
    cache = _latent_cache(vae, ds, s.latent_cache, progress, keep_images=kept)
    del kept
    from tqdm.auto import tqdm

    hints = torch.cat([control_hint(ds[i][0], s.hint, HINT_RESOLUTIONS[i % len(HINT_RESOLUTIONS)])
                       for i in tqdm(range(len(cache[2])), desc="making hints", disable=not progress)])
    return cache, (hints * 255).round().to(torch.uint8)


@torch.no_grad()
def _control_samples(sd: StableDiffusion, controlled, hints: torch.Tensor, captions: list[str], steps: int = 20,
                     cfg_scale: float = 5.0, seed: int = 0) -> torch.Tensor:
    """Pictures in [-1, 1] drawn with the ControlNet steering (DPM++ 2M Karras, CFG), for the training's samples."""
    from ..diffusion import samplers
    from ..diffusion.denoisers import DiscreteDenoiser
    from ..diffusion.guidance import CFGDenoiser

    def net(x, t, cond):  # CFG runs the conditional and unconditional halves in one batch: one hint per row
        return controlled(hints.repeat(x.shape[0] // len(hints), 1, 1, 1))(x, t, cond)

    denoiser = DiscreteDenoiser(net, sd.config.prediction)
    sigmas = denoiser.get_sigmas(steps, "karras")
    f, res = sd.config.vae.factor, sd.config.resolution
    x = torch.randn(len(captions), sd.config.unet.in_channels, res // f, res // f,
                    generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    cond, uncond = sd.text_encoder(sd.tokenizer(captions)), sd.text_encoder(sd.tokenizer([""] * len(captions)))
    z = samplers.sample_dpmpp_2m(CFGDenoiser(denoiser, cfg_scale, sigmas), x, sigmas,
                                 extra_args={"cond": cond, "uncond": uncond}, disable=True)
    return sd.vae.decode(z / sd.config.scale_factor).clamp(-1, 1)


def settings(cfg: TrainConfig) -> RecipeSettings:
    """The settings of cfg's recipe, read from cfg.extra (fine-tunings: finetune.settings)."""
    if cfg.network not in SETTINGS:
        raise ValueError(f"unknown recipe {cfg.network!r}; known: {', '.join(SETTINGS)}")
    return SETTINGS[cfg.network].from_extra(cfg.extra)


RECIPES = {"vae": train_vae, "vae-decoder": train_vae_decoder, "clip": train_clip, "unet": train_unet,
           "taesd": train_taesd, "controlnet": train_controlnet, "lcm": train_lcm,
           "upscaler": train_upscaler, "captioner": train_captioner}
SETTINGS = {"vae": VAESettings, "vae-decoder": VAEDecoderSettings, "clip": CLIPSettings, "unet": UNetSettings,
            "taesd": TAESDSettings, "controlnet": ControlNetSettings, "lcm": LCMSettings,
            "upscaler": UpscalerSettings, "captioner": CaptionerSettings}
