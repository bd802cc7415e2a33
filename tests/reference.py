"""Reference implementations (diffusers, transformers, open_clip) built to match plainsd configs.

Test-only: these libraries are test extras and the package never imports them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from plainsd.config import ModelConfig, TextConfig, UNetConfig, VAEConfig


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so that zero-initialised layers cannot hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def random_module(make, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """make()'s module with random weights drawn directly, without the library's own initialisation (which takes
    most of the time of building a full-size UNet): built on the meta device, then every parameter uniform with
    standard deviation `scale`, the scales of normalisation layers 1 plus that noise. So no layer is left at zero,
    as with perturb. Modules with buffers are refused: those would be left unset."""
    with torch.device("meta"):
        module = make()
    if next(module.buffers(), None) is not None:
        raise ValueError(f"{type(module).__name__} has buffers, which random_module would leave unset")
    module = module.to_empty(device="cpu")
    scales = {id(m.weight) for m in module.modules()
              if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None}
    g, bound = torch.Generator().manual_seed(seed), scale * 3 ** 0.5
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-bound, bound, generator=g)
            if id(p) in scales:
                p.add_(1.0)
    return module.eval()


def diffusers_unet_kwargs(cfg: UNetConfig) -> dict:
    n = len(cfg.channel_mult)
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    heads = [cfg.heads_for(c) for c in channels]
    depth = [cfg.depth_at(i) for i in range(n)] if isinstance(cfg.transformer_depth, tuple) else cfg.transformer_depth
    sdxl = dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=cfg.adm_in_channels) if cfg.adm_in_channels else {}
    return dict(**sdxl,
        sample_size=8, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=channels, layers_per_block=cfg.num_res_blocks,
        down_block_types=["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(n)],
        up_block_types=["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(range(n))],
        cross_attention_dim=cfg.context_dim, attention_head_dim=heads if cfg.head_dim > 0 else cfg.num_heads,
        use_linear_projection=cfg.use_linear_proj, norm_num_groups=cfg.norm_groups,
        transformer_layers_per_block=depth, time_cond_proj_dim=cfg.time_cond_proj_dim or None,
    )


def diffusers_controlnet_kwargs(cfg: UNetConfig, **extra) -> dict:
    """diffusers ControlNetModel settings for a ControlNet of this UNet config (extra: other settings)."""
    kwargs = diffusers_unet_kwargs(cfg)
    for name in ("sample_size", "out_channels", "up_block_types", "time_cond_proj_dim"):
        del kwargs[name]
    return {**kwargs, **extra}


def unet_pair(cfg: UNetConfig, seed: int = 0, shared: bool = False, scale: float = 0.05):
    """diffusers' UNet with random weights (random_module), and plainsd's UNet with the same weights (renamed with
    weights.unet_diffusers_names): just the UNets, where a test needs no text encoder or VAE. shared: plainsd's
    UNet holds diffusers' very tensors (no copy: one full-size SDXL UNet in memory, not two). scale: the
    spread of every weight (random_module)."""
    from diffusers import UNet2DConditionModel

    from plainsd.models.unet import UNetModel
    from plainsd.weights import _rename, unet_diffusers_names

    theirs = random_module(lambda: UNet2DConditionModel(**diffusers_unet_kwargs(cfg)), seed + 1, scale)
    pairs = unet_diffusers_names(cfg)
    with torch.device("meta" if shared else "cpu"):
        ours = UNetModel(cfg)
    ours.load_state_dict({_rename(k, pairs): v for k, v in theirs.state_dict().items()}, strict=True, assign=shared)
    return theirs, ours.eval()


def diffusers_vae_kwargs(cfg: VAEConfig, scale_factor: float = 0.18215) -> dict:
    n = len(cfg.ch_mult)
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.in_channels, latent_channels=cfg.z_channels,
        block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        norm_num_groups=cfg.norm_groups, scaling_factor=scale_factor, sample_size=64,
    )


def hf_text_kwargs(cfg: TextConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=int(cfg.width * cfg.mlp_ratio),
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.context_length,
        hidden_act=cfg.act, projection_dim=cfg.projection_dim or cfg.width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407 if cfg.pad == "eot" else 0,
    )


def build_diffusers_sdxl(config: ModelConfig, seed: int = 0):
    """(unet, vae, text_encoder or None (the refiner has none), text_encoder_2) of diffusers / transformers for an
    SDXL config, with random weights (random_module; the text towers perturbed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = random_module(lambda: UNet2DConditionModel(**diffusers_unet_kwargs(config.unet)), seed + 1)
    vae = random_module(lambda: AutoencoderKL(**diffusers_vae_kwargs(config.vae, config.scale_factor)), seed + 2)
    big_g = config.text2 or config.text
    text = None
    if config.text2 is not None:
        text = perturb(CLIPTextModel(CLIPTextConfig(**hf_text_kwargs(config.text))), seed + 3, scale=0.02)
    text2 = perturb(CLIPTextModelWithProjection(CLIPTextConfig(**hf_text_kwargs(big_g))), seed + 4, scale=0.02)
    return unet, vae, text, text2


def write_diffusers_sdxl_folder(root: Path, unet, vae, text, text2) -> Path:
    """An SDXL diffusers folder as StableDiffusionXLPipeline.save_pretrained lays it out (text_encoder absent: the
    refiner's)."""
    root.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    if text is not None:
        text.save_pretrained(root / "text_encoder")
    text2.save_pretrained(root / "text_encoder_2")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return root


def sdxl_text_reference(text, text2, ids: torch.Tensor, ids2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What diffusers' StableDiffusionXLPipeline.encode_prompt computes from token ids (each tokenizer's): the
    towers' penultimate hidden states side by side, and text_encoder_2's projected pooled output."""
    states = [] if text is None else [text(ids, output_hidden_states=True).hidden_states[-2]]
    out = text2(ids2, output_hidden_states=True)
    return torch.cat(states + [out.hidden_states[-2]], dim=-1), out.text_embeds


def build_diffusers(config: ModelConfig, seed: int = 0):
    """(unet, vae, text_encoder) of diffusers / transformers with random weights (random_module; the text encoder
    perturbed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = random_module(lambda: UNet2DConditionModel(**diffusers_unet_kwargs(config.unet)), seed + 1)
    vae = random_module(lambda: AutoencoderKL(**diffusers_vae_kwargs(config.vae, config.scale_factor)), seed + 2)
    text = perturb(CLIPTextModel(CLIPTextConfig(**hf_text_kwargs(config.text))), seed + 3, scale=0.02)
    return unet, vae, text


def write_diffusers_folder(root: Path, config: ModelConfig, unet, vae, text, safe_serialization: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(root / "unet", safe_serialization=safe_serialization)
    vae.save_pretrained(root / "vae", safe_serialization=safe_serialization)
    text.save_pretrained(root / "text_encoder", safe_serialization=safe_serialization)
    (root / "tokenizer").mkdir(exist_ok=True)
    pad = "<|endoftext|>" if config.text.pad == "eot" else "!"
    (root / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    (root / "scheduler").mkdir(exist_ok=True)
    prediction = "v_prediction" if config.prediction == "v" else "epsilon"
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def build_open_clip_text(cfg: TextConfig, seed: int = 0):
    """open_clip's text tower (the SD2 text encoder) with random, perturbed weights."""
    from open_clip.model import CLIPTextCfg, _build_text_tower

    torch.manual_seed(seed)
    tower = _build_text_tower(cfg.projection_dim or cfg.width, CLIPTextCfg(
        context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width, heads=cfg.heads,
        layers=cfg.layers, mlp_ratio=cfg.mlp_ratio), quick_gelu=cfg.act == "quick_gelu")
    return perturb(tower, seed + 4, scale=0.02)


def open_clip_hidden(tower, ids: torch.Tensor, skip: int = 1) -> torch.Tensor:
    """open_clip's hidden states after all but the last skip-1 layers, then ln_final."""
    x, mask = tower._embeds(ids)
    for block in list(tower.transformer.resblocks)[: len(tower.transformer.resblocks) - skip + 1]:
        x = block(x, attn_mask=mask)
    return tower.ln_final(x)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def diffusers_from_our_file(path, config):
    """Read a plainsd-written file with diffusers' own single-file converters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    ckpt = {k: v.float() for k, v in load_file(str(path)).items()}  # the models compute in float32
    with torch.device("meta"):  # no initialisation: every weight comes from the file (assign)
        unet = UNet2DConditionModel(**diffusers_unet_kwargs(config.unet))
        vae = AutoencoderKL(**diffusers_vae_kwargs(config.vae))
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), strict=True, assign=True)
    text = CLIPTextModel(CLIPTextConfig(**hf_text_kwargs(config.text)))
    if config.text.layout == "openclip":
        state = convert_open_clip_checkpoint(text, ckpt)
        state = {k: v for k, v in state.items() if k != "text_projection.weight"}
        # diffusers drops SD2's last text layer (it only ever uses the penultimate one)
        layers = len({k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")})
        text = CLIPTextModel(CLIPTextConfig(**{**hf_text_kwargs(config.text), "num_hidden_layers": layers}))
    else:
        state = convert_ldm_clip_checkpoint(ckpt)
    missing, unexpected = text.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return unet.eval(), vae.eval(), text.eval()
