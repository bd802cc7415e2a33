"""Teaching a trained model something new from a handful of images: DreamBooth, textual inversion, LoRA.

All three minimise the same denoising loss as the base training, on the instance images' latents:
- dreambooth (Ruiz et al. 2022): every UNet weight (optionally the text encoder too) is trained; with prior
  preservation, class images that the base model drew from class prompts are trained on beside them with
  their own loss (weight `prior_weight`), so that the model keeps drawing what it drew before;
- textual-inversion (Gal et al. 2022): only new token vectors, initialised from a word; the model is untouched;
- lora (Hu et al. 2021): low-rank adapters beside the attention projections; saved in kohya's format.

On an SDXL base model the UNet is conditioned as generation conditions it (models/sdxl.conditioning): both towers'
penultimate states, bigG's pooled text and the size numbers, with each picture's source size and crop corner
(data.Crop) as original size and crop, and the training size as target size. LoRA adapters go on the UNet and
optionally both towers, named as kohya's SDXL trainer names them (lora_unet_ in the original UNet's names, lora_te1_,
lora_te2_); textual inversion trains vectors in both towers' tables, saved as clip_l and clip_g. An SDXL refiner
takes LoRA and DreamBooth (its conditioning holds the aesthetic score), not textual inversion.

The settings live in TrainConfig.extra, read into the method's settings class below (settings(cfg)); the data is
a folder of images with captions (data.kind = "folder"), or, for the proofs on the shipped model, renders of the
shapes world (data.kind = "shapes"): data.shapes = ["heart"], a shape the base model never saw, with
data.sizes = ["large"] because the 8x8x4 latent of a 64-px image cannot hold a small one; or, for textual
inversion, which can only find input vectors for what the frozen UNet already draws, one scene the base model
draws from words (every one of data.shapes, sizes, colours, positions, backgrounds fixed to one value).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import lora as lora_mod
from ..diffusion.denoisers import training_loss
from ..embeddings import Embedding, EmbeddingSet, save_embedding, text_width
from ..images import contact_sheet, to_tensor
from ..models.sdxl import conditioning, size_numbers
from ..pnginfo import save_png
from ..prompts import tokenize_chunks
from ..weights import load, save, write_safetensors
from .data import Crop, FolderDataset, ShapesDataset
from . import dist
from .loop import TrainConfig, train
from .recipes import object_weights, sample_posterior
from .settings import RecipeSettings

SHAPES_CHOICES = ("shapes", "sizes", "colours", "positions", "backgrounds")  # data.kind = shapes: the values each
                                        # instance image draws from (all colours, positions, backgrounds by default)
CLASS_PROMPTS_SEED = 5  # class_prompts = "shapes": captions of this seed of the shapes world (not the held-out prompts')


@dataclass
class FinetuneSettings(RecipeSettings):
    """What every fine-tuning method reads from extra."""
    model: str | None = None            # the base checkpoint; None: the shipped model
    instance_prompt: str | None = None  # one caption for every instance image (e.g. "a sks heart"); None: the captions
    validation_prompts: list[str] = field(default_factory=list)  # drawn into samples/ every sample_every steps
    num_instance_images: int = 12       # data.kind = shapes: how many renders
    object_weight: float = 1.0          # weight of the latent pixels objects touch in the loss (as the unet-objects
                                        # recipe trained the shipped UNet); 1: the plain loss


@dataclass
class DreamBoothSettings(FinetuneSettings):
    recipe: ClassVar[str] = "dreambooth"
    class_prompts: list[str] | str = field(default_factory=list)  # prior preservation: what the base model draws as
                                        # class images; "shapes": one caption of the shapes world per class image
    num_class_images: int = 64          # class images drawn (0: no prior preservation)
    prior_weight: float = 1.0           # weight of the class images' loss
    train_text_encoder: bool = False    # train the text encoder too


@dataclass
class TextualInversionSettings(FinetuneSettings):
    recipe: ClassVar[str] = "textual-inversion"
    token: str = "sks-heart"            # the embedding's name, written in prompts
    init_word: str = "shape"            # the vectors start as this word's
    vectors: int = 1                    # vectors per token


@dataclass
class LoRASettings(FinetuneSettings):
    recipe: ClassVar[str] = "lora"
    rank: int = 4                       # the adapters' rank
    alpha: float = 4.0                  # the update is scaled by alpha / rank
    train_text_encoder: bool = False    # adapters on the text encoder too


SETTINGS = {"dreambooth": DreamBoothSettings, "textual-inversion": TextualInversionSettings, "lora": LoRASettings}
METHODS = tuple(SETTINGS)


def settings(cfg: TrainConfig) -> FinetuneSettings:
    """The settings of cfg's fine-tuning method, read from cfg.extra."""
    if cfg.network not in SETTINGS:
        raise ValueError(f"unknown fine-tuning method {cfg.network!r}; known: {', '.join(METHODS)}")
    return SETTINGS[cfg.network].from_extra(cfg.extra)


def output_name(method: str, token: str = TextualInversionSettings.token) -> str:
    """The file a fine-tuning writes into its run folder (textual inversion: named after its token)."""
    return {"dreambooth": "model.safetensors", "lora": "lora.safetensors",
            "textual-inversion": f"{token}.safetensors"}[method]


def class_prompts(s: DreamBoothSettings) -> list[str]:
    """The class prompts as a list ("shapes": varied captions of the base model's own world)."""
    if s.class_prompts == "shapes":
        return [ShapesDataset(seed=CLASS_PROMPTS_SEED).scene(i).caption for i in range(s.num_class_images)]
    return [s.class_prompts] if isinstance(s.class_prompts, str) else list(s.class_prompts)


def instance_data(cfg: TrainConfig, s: FinetuneSettings, size: int) -> list[tuple]:
    """[(PIL image, caption, Crop: where the picture came from)] of the instance images."""
    data = dict(cfg.data)
    kind = data.get("kind", "folder")
    if kind == "folder":
        if "path" not in data:
            raise ValueError("data.path must name the folder of instance images")
        ds = FolderDataset(data["path"], size=size)
        items = [(*ds[i][:2], ds.crop(i)) for i in range(len(ds))]
    elif kind == "shapes":
        unknown = sorted(set(data) - {"kind", "seed", *SHAPES_CHOICES})
        if unknown:
            raise ValueError(f"data.{unknown[0]} is not a setting of shapes data; allowed: seed, "
                             f"{', '.join(SHAPES_CHOICES)}")
        choices = {k: tuple(data[k]) for k in SHAPES_CHOICES if k in data}
        ds = ShapesDataset(seed=data.get("seed", 77), size=size, two_objects=0.0,
                           **{"shapes": ("heart",), "sizes": ("small", "large"), **choices})
        items = [(*ds[i][:2], Crop(size, size)) for i in range(s.num_instance_images)]
    else:
        raise ValueError(f"unknown data kind {kind!r}; known: folder, shapes")
    if s.instance_prompt:
        items = [(image, s.instance_prompt, crop) for image, _, crop in items]
    elif not all(c for _, c, _ in items):
        raise ValueError("some instance images have no caption: give them .txt captions or set instance_prompt")
    return items


def class_data(sd, s: DreamBoothSettings, out: Path, progress: bool) -> list[tuple]:
    """[(PIL image, class prompt, Crop)]: the base model's own pictures for the class prompts, drawn once and cached
    in out/class_images."""
    prompts = class_prompts(s)
    if not prompts or not s.num_class_images:
        return []
    from PIL import Image

    from ..pipeline import txt2img

    folder = out / "class_images"
    folder.mkdir(parents=True, exist_ok=True)
    mine = range(dist.rank(), s.num_class_images, dist.size())  # under torchrun each process draws its share
    for i in mine:
        path = folder / f"{i:04d}.png"
        if not path.is_file():  # a resumed run reuses what was drawn
            result = txt2img(sd, prompts[i % len(prompts)], seed=10_000 + i)
            save_png(result.images[0], path, result.infotexts[0])
            if progress and dist.is_main():
                print(f"\rclass images {i + 1}/{s.num_class_images}", end="", flush=True)
    if progress and dist.is_main():
        print()
    dist.barrier()
    images = [Image.open(folder / f"{i:04d}.png").convert("RGB") for i in range(s.num_class_images)]
    return [(image, prompts[i % len(prompts)], Crop(*image.size)) for i, image in enumerate(images)]


@torch.no_grad()
def _latents(sd, items, object_weight: float = 1.0) -> tuple:
    """(means, stds, captions, per-latent-pixel loss weights or None, SDXL's size numbers [N, n] or None) of the
    (image, caption, Crop) items."""
    images = torch.cat([to_tensor(im) for im, _, _ in items])
    post = sd.vae.encode(images)
    weights = None
    if object_weight != 1:
        weights = F.max_pool2d(object_weights(images, object_weight), images.shape[-1] // post.mean.shape[-1])
    numbers = size_conditions(sd, [crop for *_, crop in items], images.shape[-1], images.shape[-2])
    return post.mean, post.std, [c for _, c, _ in items], weights, numbers


def size_conditions(sd, crops: list[Crop], width: int, height: int) -> torch.Tensor | None:
    """[N, n]: the numbers SDXL's UNet gets for pictures of width x height cut from these sources (models/sdxl's
    size_numbers: the source's size as original size, the crop's corner, the training size as target size; the
    refiner: its prompts' aesthetic score); None for other models."""
    if not sd.config.sdxl:
        return None
    return torch.tensor([size_numbers(sd.config.sdxl, width, height, c.top, c.left, original=(c.width, c.height))
                         for c in crops])


@dataclass
class Trainable:
    """What a fine-tuning method trains, and what the text encoder needs to encode captions with it."""
    params: dict[str, torch.nn.Parameter]      # what the optimizer moves, by name
    grad_text: bool = False                    # whether gradients flow through the text encoder
    vectors: torch.nn.Parameter | None = None  # textual inversion: the new token's vectors
    embeddings: EmbeddingSet | None = None     # textual inversion: the set that puts them in prompts
    adapters: dict | None = None               # lora: the adapters hooked onto the model


def trainable(sd, s: FinetuneSettings, captions: list[str]) -> Trainable:
    """Make the model's trainable part for the method: new token vectors, LoRA adapters, or the UNet itself."""
    if isinstance(s, TextualInversionSettings):
        return _token_vectors(sd, s, captions)
    if isinstance(s, LoRASettings):
        adapters = lora_mod.attach(sd, rank=s.rank, alpha=s.alpha, text_encoder=s.train_text_encoder)
        params = {f"{k}.{n}": p for k, a in adapters.items() for n, p in a.named_parameters()}
        for p in params.values():
            p.requires_grad_(True)
        return Trainable(params, grad_text=s.train_text_encoder, adapters=adapters)
    sd.unet.requires_grad_(True)
    params = {"unet." + k: p for k, p in sd.unet.named_parameters()}
    if s.train_text_encoder:
        sd.text_encoder.requires_grad_(True)
        params.update({"text." + k: p for k, p in sd.text_encoder.named_parameters()})
    return Trainable(params, grad_text=s.train_text_encoder)


def token_tables(sd) -> list[torch.Tensor]:
    """The token embedding table of each text tower (SDXL: CLIP-L's, then bigG's, the order of the towers' columns
    in an embedding's vectors)."""
    return [tower.text_model.embeddings.token_embedding.weight for tower in sd.text_towers]


def initial_vectors(sd, s: TextualInversionSettings) -> torch.Tensor:
    """[s.vectors, width]: the token vectors of s.init_word, repeated in turn to fill s.vectors rows; for SDXL each
    tower's vectors side by side (width = both towers' widths)."""
    init_ids = sd.tokenizer.encode(s.init_word) or sd.tokenizer.encode("shape")
    rows = [init_ids[i % len(init_ids)] for i in range(s.vectors)]
    return torch.cat([table[rows] for table in token_tables(sd)], dim=1).float()


def embedding(sd, token: str, vectors: torch.Tensor, step: int | None = None) -> Embedding:
    """The token's vectors as the embedding file holds them (SDXL's: CLIP-L's columns as clip_l, bigG's as clip_g)."""
    return Embedding(token, vectors, step, clip_l=sd.config.text.width if sd.config.text2 is not None else 0)


def _token_vectors(sd, s: TextualInversionSettings, captions: list[str]) -> Trainable:
    """Textual inversion's new token: s.vectors vectors started from s.init_word's, which the captions must use."""
    width, vocab = text_width(sd.config), sd.config.text.vocab_size
    init = initial_vectors(sd, s).detach()
    vectors = torch.nn.Parameter(init.clone())
    embset = EmbeddingSet([embedding(sd, s.token, init)], sd.tokenizer, width, vocab)
    if not embset.names:
        raise ValueError(f"token {s.token!r} has no text to write in prompts")
    if not any(i >= vocab for c in captions for chunk in tokenize_chunks(sd.tokenizer, c, embset) for i in chunk[0]):
        raise ValueError(f"the captions never mention the token {s.token!r}; set instance_prompt, e.g. 'a {s.token}'")
    return Trainable({"emb": vectors}, grad_text=True, vectors=vectors, embeddings=embset)


def text_conditioning(sd, trained: Trainable, captions: list[str], numbers: torch.Tensor | None = None,
                      rows: slice | None = None):
    """What the UNet is given for the captions in a training step: their text states (the first 75 tokens, as
    written: no emphasis), with gradients into what is trained there; for SDXL the dict generation gives it too
    (models/sdxl.conditioning: both towers' states, bigG's pooled text and the size numbers [B, n]). With rows, only
    those rows are encoded (the others, zeros, are never read)."""
    ids = torch.tensor([tokenize_chunks(sd.tokenizer, c, trained.embeddings)[0][0] for c in captions])
    with torch.set_grad_enabled(trained.grad_text):
        if sd.config.sdxl:
            encoded = sd.text_encoder.encode(dist.take(rows, ids), extra=trained.vectors)
        else:
            encoded = (sd.text_encoder(dist.take(rows, ids), extra=trained.vectors),)
    if rows is not None:
        encoded = tuple(_rows_of(t, rows, len(captions)) for t in encoded)
    return conditioning(*encoded, numbers) if sd.config.sdxl else encoded[0]


def _rows_of(t: torch.Tensor, rows: slice, n: int) -> torch.Tensor:
    """t, the rows of a batch of n, in place in a batch of zeros."""
    full = t.new_zeros(n, *t.shape[1:])
    full[rows] = t
    return full


def _unet_net(unet):
    """The UNet as training_loss's net: (x, t, cond) -> prediction, cond a tensor or SDXL's conditioning dict."""
    def net(x, t, cond):
        if isinstance(cond, dict):
            return unet(x, t, cond["crossattn"], y=cond["vector"])
        return unet(x, t, cond)
    return net


def check_model(sd, s: FinetuneSettings) -> None:
    """Refuse, in one sentence, what a method cannot do on this model."""
    if isinstance(s, TextualInversionSettings) and sd.config.sdxl == "refiner":
        raise ValueError("textual inversion on an SDXL refiner is not supported (no tool reads a bigG-only "
                         "embedding); train it on the SDXL base model, whose embeddings hold clip_l and clip_g")


def finetune(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    method, s = cfg.network, settings(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    sd = load(s.model).float()
    sd.requires_grad_(False)
    check_model(sd, s)
    scale = sd.config.scale_factor
    instances = instance_data(cfg, s, sd.config.resolution)
    inst = _latents(sd, instances, s.object_weight)
    prior = class_data(sd, s, out, progress) if isinstance(s, DreamBoothSettings) else []
    cls = _latents(sd, prior, s.object_weight) if prior else None
    trained = trainable(sd, s, inst[2])
    net = _unet_net(sd.unet)

    def loss_fn(step, micro):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 31 + micro)
        rng = random.Random(f"{cfg.seed}:{step}:{micro}")
        rows = dist.rows(cfg.batch_size)

        def draw(mean, std, captions, weights, numbers):
            """(latents, conditioning, loss weights) of a batch drawn from these pictures."""
            idx = [rng.randrange(len(captions)) for _ in range(cfg.batch_size)]
            z = sample_posterior(mean[idx], std[idx], g) * scale
            cond = text_conditioning(sd, trained, [captions[i] for i in idx], None if numbers is None else numbers[idx],
                                     rows)
            return z, cond, None if weights is None else weights[idx]
        z, cond, w = draw(*inst)
        loss = training_loss(net, z, cond, sd.config.prediction, generator=g, weights=w, rows=rows)
        if cls is not None:
            zc, cc, wc = draw(*cls)
            loss = loss + s.prior_weight * training_loss(net, zc, cc, sd.config.prediction, generator=g, weights=wc,
                                                         rows=rows)
        return loss

    made = out / (output_name(method, s.token) if isinstance(s, TextualInversionSettings) else output_name(method))

    def export(step, weights):
        if isinstance(s, TextualInversionSettings):
            save_embedding(embedding(sd, s.token, weights["emb"], step), made, checkpoint_name=sd.name)
        elif isinstance(s, LoRASettings):
            meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(s.rank),
                    "ss_network_alpha": str(s.alpha), "ss_steps": str(step), "ss_base_model": sd.name,
                    "plainsd.finetune": json.dumps(dataclasses.asdict(cfg))}
            if sd.config.sdxl == "base":  # kohya's name for the family, by which tools sort LoRAs
                meta["ss_base_model_version"] = "sdxl_base_v1-0"
            write_safetensors(lora_mod.adapters_state(trained.adapters), made, meta)
        else:
            sd.eval()
            save(sd, made, dtype=torch.float16)

    def sample(step, weights):
        from ..pipeline import txt2img

        prompts = s.validation_prompts or [instances[0][1]]
        kwargs = {}
        if isinstance(s, TextualInversionSettings):
            export(step, weights)
            kwargs["embeddings_dir"] = out
        pics = [txt2img(sd, p, seed=i, **kwargs).images[0] for i, p in enumerate(prompts * (8 // len(prompts) or 1))]
        (out / "samples").mkdir(exist_ok=True)
        contact_sheet(pics).save(out / "samples" / f"{method}-{step:06d}.png")

    cfg = dataclasses.replace(cfg, ema_decay=0.0)
    result = train(cfg, trained.params, loss_fn, resume, sample, export, progress)
    result["model"], result["output"] = sd, made
    return result
