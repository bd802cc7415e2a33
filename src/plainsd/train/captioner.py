"""plainsd's own captioner for the shapes world, trained on renders of the world and their true captions.

Each scene's target is its full caption: every object's size, colour, shape and position and the background,
in one fixed phrasing ("a large red circle on the left and a small blue square on the right, gray background"),
objects left to right and top to bottom. The shapes world's own captions vary their wording and leave attributes
out, which is right for teaching a generator to fill gaps, but a captioner taught on them would learn to leave
things out at random; one phrasing, all attributes, is what a caption for training data should say. It is also a
phrasing the shipped model was trained to read (the grammar's own words, train/data.py).

The pictures are renders of scenes of all seven shapes (the held-out heart and star too: a user captions renders
of a new concept with it), extra.vae_share of them through the shipped VAE's round trip (encoded, a sample of
the posterior decoded), which is how the generator's pictures look at their best, so that the captioner reads
those as well as clean renders. The renders are made once into a pool; batches draw from it.
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

from ..config import CaptionerConfig
from ..images import to_tensor
from ..models.captioner import PAD, Captioner
from ..weights import DEFAULT_MODEL, write_safetensors
from .data import ALL_SHAPES, BACKGROUNDS, COLOURS, POSITIONS, SIZES, Scene, ShapesDataset, render
from .loop import TrainConfig, atomic_write, train
from .settings import RecipeSettings

POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "centre": "in the centre"}
_ORDER = {"left": 0, "top": 0, "centre": 0, "right": 1, "bottom": 1}  # reading order of a pair of objects
WORDS = tuple(dict.fromkeys(["a", "and", ",", "background", "on", "the", "at", "in", *SIZES, *COLOURS, *BACKGROUNDS,
                             *ALL_SHAPES, *POSITIONS]))


def full_caption(scene: Scene) -> str:
    """The scene's caption with every attribute stated, in the captioner's one phrasing."""
    objects = sorted(scene.objects, key=lambda o: _ORDER[o.position])
    phrases = [f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position]}" for o in objects]
    return " and ".join(phrases) + f", {scene.background} background"


def split_words(text: str) -> list[str]:
    """A caption's words, the comma one of them."""
    return text.replace(",", " , ").split()


def join_words(words: list[str]) -> str:
    return " ".join(words).replace(" ,", ",")


@dataclass
class CaptionerSettings(RecipeSettings):
    """A captioner for the shapes world (the network's sizes are the config's "model": CaptionerConfig's fields)."""
    recipe: ClassVar[str] = "captioner"
    model: str | None = None      # the checkpoint (or VAE file) whose VAE round trip makes vae_share of the pictures
    scenes: int = 16384           # scenes rendered once into the pool that batches draw from
    vae_share: float = 0.25       # share of the pool that goes through the VAE's round trip
    noise: float = 0.02           # std of Gaussian noise added to each picture in [-1, 1] (a little robustness)
    validation: int = 256         # scenes of another seed captioned at each sample step (exact-match share)
    fp16: bool = True             # export the file in float16

    def check(self):
        if self.scenes < 1 or self.validation < 0 or not 0 <= self.vae_share <= 1 or self.noise < 0:
            raise ValueError(f"the captioner recipe needs extra.scenes at least 1, extra.validation at least 0, "
                             f"extra.vae_share in [0, 1] and extra.noise at least 0; got {self.scenes}, "
                             f"{self.validation}, {self.vae_share}, {self.noise}")


def captioner_config(cfg: TrainConfig) -> CaptionerConfig:
    """CaptionerConfig with the config's "model" values and the grammar's words."""
    known = {f.name for f in dataclasses.fields(CaptionerConfig)} - {"words"}
    unknown = [k for k in cfg.model if k not in known]
    if unknown:
        raise ValueError(f"the captioner recipe's model has no setting {unknown[0]!r}; allowed: "
                         f"{', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.items()}
    return CaptionerConfig(words=WORDS, **values)


def token_ids(net: Captioner, captions: list[str]) -> torch.Tensor:
    """[N, max_length] ids of the captions (start, words, end, padding)."""
    rows = [net.encode_words(split_words(c)) for c in captions]
    if max(map(len, rows)) > net.config.max_length:
        raise ValueError(f"a caption is longer than the captioner's max_length {net.config.max_length}")
    return torch.tensor([r + [PAD] * (net.config.max_length - len(r)) for r in rows])


def render_pool(scenes: list[Scene], size: int, vae=None, vae_share: float = 0.0, seed: int = 0) -> torch.Tensor:
    """uint8 [N, 3, size, size] renders of the scenes, the last vae_share of them through the VAE's round trip."""
    from .upscaler import to_bytes, vae_round_trip

    pool = torch.cat([to_bytes(to_tensor(render(s, size))) for s in scenes])
    plain = len(scenes) - round(vae_share * len(scenes))
    if vae is not None and plain < len(scenes):
        pool[plain:] = vae_round_trip(vae, pool[plain:], torch.Generator().manual_seed(seed))
    return pool


def to_input(pool: torch.Tensor) -> torch.Tensor:
    return pool.float() / 127.5 - 1


@torch.no_grad()
def exact_share(net: Captioner, pool: torch.Tensor, captions: list[str], batch: int = 128) -> float:
    """Share of the pictures whose caption the network writes word for word."""
    words = [w for i in range(0, len(pool), batch) for w in net.generate(to_input(pool[i:i + batch]))]
    return sum(join_words(w) == c for w, c in zip(words, captions)) / max(len(captions), 1)


def _data(cfg: TrainConfig, s: CaptionerSettings, net: Captioner, progress: bool):
    """The training pool, its token ids, and the validation pool and captions (another seed, plain renders)."""
    from .recipes import dataset, load_vae

    if cfg.data.get("kind", "shapes") != "shapes":
        raise ValueError("the captioner recipe needs the shapes data (it knows each render's true scene); "
                         f"data.kind must be \"shapes\", not {cfg.data['kind']!r}")
    ds = dataset(cfg, net.config.image_size)
    scenes = [ds.scene(i % len(ds)) for i in range(s.scenes)]
    vae = load_vae(s.model or DEFAULT_MODEL)[0].float().requires_grad_(False) if s.vae_share else None
    if progress:
        print(f"captioner: rendering {s.scenes} scenes ({s.vae_share:.0%} through the VAE)", flush=True)
    pool = render_pool(scenes, net.config.image_size, vae, s.vae_share, cfg.seed)
    ids = token_ids(net, [full_caption(sc) for sc in scenes])
    val = ShapesDataset(seed=ds.seed + 1_000, shapes=ds.shapes)
    val_scenes = [val.scene(i) for i in range(s.validation)]
    return pool, ids, render_pool(val_scenes, net.config.image_size), [full_caption(sc) for sc in val_scenes]


def train_captioner(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train the captioner (cross-entropy on the next word of the full caption); writes captioner.safetensors
    (the EMA weights when cfg.ema_decay > 0) with its config, the recipe and the step in the metadata."""
    from .recipes import _named, _swapped

    s = CaptionerSettings.from_extra(cfg.extra)
    torch.manual_seed(cfg.seed)
    net = Captioner(captioner_config(cfg))
    pool, ids, val_pool, val_captions = _data(cfg, s, net, progress)
    out = Path(cfg.out)

    def loss_fn(step, micro):
        rng = random.Random(f"{cfg.seed}:{step}:{micro}")
        idx = torch.tensor([rng.randrange(len(pool)) for _ in range(cfg.batch_size)])
        x = to_input(pool[idx])
        if s.noise:
            x = x + s.noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)))
        target = ids[idx]
        length = int((target != PAD).sum(1).max())
        logits = net(x, target[:, :length - 1])
        return F.cross_entropy(logits.flatten(0, 1).float(), target[:, 1:length].flatten(), ignore_index=PAD)

    def export(step, weights):
        meta = {"plainsd.recipe": json.dumps(dataclasses.asdict(cfg)), "plainsd.steps": str(step),
                "plainsd.captioner_config": json.dumps(dataclasses.asdict(net.config))}
        dtype = torch.float16 if s.fp16 else torch.float32
        write_safetensors({k: v.to(dtype) for k, v in weights.items()}, out / "captioner.safetensors", meta)

    def sample(step, weights):
        with _swapped(net, weights):
            net.eval()
            share = exact_share(net, val_pool, val_captions)
            net.train()
        (out / "samples").mkdir(exist_ok=True)
        atomic_write(out / "samples" / f"captioner-{step:06d}.txt", f"step {step}: {share:.4f} of {len(val_captions)} "
                     "validation captions word for word\n")
        if progress:
            print(f"\ncaptioner: step {step}: {share:.1%} of the validation captions word for word", flush=True)

    net.train()
    return train(cfg, _named(net), loss_fn, resume, sample, export, progress)
