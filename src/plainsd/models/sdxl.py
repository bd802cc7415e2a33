"""SDXL's conditioning (Podell et al. 2023): two text towers read together, and the vector of pooled text and
picture sizes that the UNet adds to its timestep embedding (models/unet.py, label_emb).

SDXLTextEncoder holds its towers under the names the original files use after `conditioner.`:
embedders.0.transformer (OpenAI CLIP ViT-L, transformers' names) and embedders.1.model (OpenCLIP ViT-bigG, whose
OpenCLIP names plainsd.weights converts as for SD2). The refiner has bigG alone, as embedders.0.model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .clip import CLIPTextModel
from .layers import timestep_embedding

END = 49407          # <|endoftext|>: where a prompt's tokens end and the padding starts
SIZE_EMBED_DIM = 256  # sinusoids per number of the vector (sgm's ConcatTimestepEmbedderND outdim, diffusers'
                      # addition_time_embed_dim)


class SDXLTextEncoder(nn.Module):
    """Token ids [B, T] -> the towers' states side by side [B, T, sum of widths]; encode() also gives the pooled
    text of the last tower (bigG: its last layer, final norm and projection at the end token).

    Both towers read the same tokens, each with its own padding after the end token (CLIP-L's tokenizer repeats
    the end token, OpenCLIP's pads with 0), as A1111 re-pads them and diffusers' two tokenizers give them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embedders = nn.ModuleList()
        for cfg in [config.text] + ([config.text2] if config.text2 is not None else []):
            holder = nn.Module()
            setattr(holder, "model" if cfg.layout == "openclip" else "transformer", CLIPTextModel(cfg))
            self.embedders.append(holder)
        self.config = config.text2 or config.text  # the tower whose pooled output the UNet gets

    @property
    def towers(self) -> list[CLIPTextModel]:
        return [e.model if hasattr(e, "model") else e.transformer for e in self.embedders]

    @property
    def dtype(self) -> torch.dtype:
        return self.towers[-1].dtype

    def forward(self, ids: torch.Tensor, clip_skip: int | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(ids, clip_skip, extra, pooled=False)[0]

    def encode(self, ids: torch.Tensor, clip_skip: int | None = None, extra: torch.Tensor | None = None,
               pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(states [B, T, sum of widths], pooled text [B, projection] or None). clip_skip counts from each tower's
        last layer (2, the default: the penultimate layer SDXL was trained on). extra: textual-inversion vectors
        [n, sum of widths], each tower's columns in the towers' order (an SDXL embedding's clip_l, then clip_g)."""
        states, last, start = [], None, 0
        for i, tower in enumerate(self.towers):
            want = pooled and i == len(self.towers) - 1
            width = tower.config.width
            mine = extra[:, start:start + width] if extra is not None else None
            start += width
            s, p = tower.encode(repad(ids, tower.config.pad), clip_skip, mine, pooled=want)
            states.append(s)
            last = p if want else last
        return torch.cat(states, dim=-1), last


def repad(ids: torch.Tensor, pad: str) -> torch.Tensor:
    """Token ids with everything after each row's first end token set to the tower's padding: the end token
    ("eot") or 0 ("zero")."""
    seen = (ids == END).int().cumsum(dim=1)
    after = (seen > 1) | ((seen == 1) & (ids != END))
    return ids.masked_fill(after, END if pad == "eot" else 0)


def size_numbers(kind: str, width: int, height: int, crop_top: int = 0, crop_left: int = 0,
                 aesthetic_score: float = 6.0, original: tuple[int, int] | None = None) -> list[float]:
    """The numbers SDXL embeds after the pooled text: original size (h, w), crop top-left (top, left), then the
    target size (h, w) for the base model or the aesthetic score for the refiner. A1111 gives the picture's own
    size as both sizes and crop 0, 0 (its defaults); the refiner's score 6 for prompts, 2.5 for negative ones.
    original: the (width, height) a training picture had before it was scaled and cropped to width x height
    (None: width, height), as SDXL was trained and diffusers' and kohya's trainers condition."""
    original_w, original_h = original or (width, height)
    numbers = [original_h, original_w, crop_top, crop_left]
    if kind == "base":
        return [float(n) for n in numbers + [height, width]]
    if kind == "refiner":
        return [float(n) for n in numbers + [aesthetic_score]]
    raise ValueError(f"SDXL conditioning is 'base' or 'refiner', got {kind!r}")


def vector(pooled: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
    """The UNet's vector y: the pooled text [B, P] then each number [B, n] as 256 sinusoids (cosines first), as
    sgm's GeneralConditioner concatenates them and diffusers' text_time embedding does."""
    b, n = numbers.shape
    sizes = timestep_embedding(numbers.reshape(-1), SIZE_EMBED_DIM).reshape(b, n * SIZE_EMBED_DIM)
    return torch.cat([pooled.float(), sizes.to(pooled.device)], dim=1)


def conditioning(states: torch.Tensor, pooled: torch.Tensor, numbers: torch.Tensor) -> dict[str, torch.Tensor]:
    """What an SDXL UNet gets beside the latents, in generation and in fine-tuning alike, as A1111's dict: the text
    states [B, T, width] as "crossattn" and the vector y of the pooled text [B, P] and the size numbers [B, n]
    (size_numbers) as "vector"."""
    return {"crossattn": states, "vector": vector(pooled, numbers)}
