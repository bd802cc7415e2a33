"""plainsd: Stable Diffusion in plain, readable PyTorch, fast on ordinary CPUs.

    import plainsd
    sd = plainsd.build("sd15", seed=0)      # random weights; "tiny" presets for tests
    sd = plainsd.load("model.safetensors")  # original single file or a diffusers folder
    plainsd.save(sd, "out.safetensors")     # original single-file layout
"""

from __future__ import annotations

import torch

from .config import PRESETS, ModelConfig, preset
from .models import StableDiffusion
from .weights import CheckpointError, load, save

__version__ = "0.1.0"


def build(name_or_config: str | ModelConfig = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """A model with random weights from a preset name (see plainsd.config.PRESETS) or a config."""
    config = preset(name_or_config) if isinstance(name_or_config, str) else name_or_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sd = StableDiffusion(config)
    sd.name = name_or_config if isinstance(name_or_config, str) else "random"
    return sd.to(dtype).eval().requires_grad_(False)


__all__ = ["build", "load", "save", "preset", "PRESETS", "ModelConfig", "StableDiffusion", "CheckpointError"]
