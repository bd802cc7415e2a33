"""The networks of Stable Diffusion, as plain nn.Modules."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .clip import CLIPTextModel
from .sdxl import SDXLTextEncoder
from .tokenizer import Tokenizer
from .unet import UNetModel
from .vae import AutoencoderKL


class StableDiffusion(nn.Module):
    """The tokenizer and the three networks of one model, with the config they were built from."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer("sd2" if config.text.pad == "zero" else "sd1", config.text.context_length)
        self.text_encoder = SDXLTextEncoder(config) if config.sdxl else CLIPTextModel(config.text)
        self.unet = UNetModel(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.name = "random"  # a file's stem once loaded
        # Generation defaults the model's maker recommends (steps, sampler, schedule, cfg_scale, width,
        # height); read from the checkpoint's metadata, used where a caller leaves a setting out.
        self.defaults: dict = {}
        self.hash: str | None = None  # A1111's short hash of the file, where the server knows it
        self.tiny_decoder_path = None  # a TAESD decoder file beside the checkpoint, for fast mode (models/taesd.py)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def text_towers(self) -> list[nn.Module]:
        """The CLIP text models: SD1/2's one, SDXL's CLIP-L and bigG (the refiner's bigG alone)."""
        return self.text_encoder.towers if self.config.sdxl else [self.text_encoder]

    def __repr__(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        kind = family(self.config)
        return (f"StableDiffusion({self.name!r}, {kind}, prediction={self.config.prediction}, "
                f"unet in_channels={self.config.unet.in_channels}, {params / 1e6:.1f}M parameters, {self.dtype})")


def family(config: ModelConfig) -> str:
    """The model family a config belongs to, as people name it: SD1, SD2, SDXL or SDXL refiner."""
    if config.sdxl:
        return "SDXL" if config.sdxl == "base" else "SDXL refiner"
    return "SD2" if config.text.layout == "openclip" or config.unet.context_dim == 1024 else "SD1"


__all__ = ["StableDiffusion", "Tokenizer", "CLIPTextModel", "SDXLTextEncoder", "UNetModel", "AutoencoderKL", "family"]
