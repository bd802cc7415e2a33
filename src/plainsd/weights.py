"""Loading and saving checkpoints.

plainsd's module names are the original (CompVis / Stability) checkpoint keys, so the single-file
layout loads with a prefix per network; only OpenCLIP's text tower (SD2) and the diffusers folder
layout need renaming. Every load is strict: a file that does not fit the model raises one
CheckpointError that names the problem and the first few keys, never a silent partial load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import AdapterConfig, BlipConfig, ModelConfig, TextConfig, UNetConfig, VAEConfig
from .diffusion.denoisers import PREDICTIONS
from .models import AutoencoderKL, StableDiffusion, family
from .models.blip import BlipCaptionModel
from .models.controlnet import HINT_CHANNELS, ControlNet
from .models.sdxl import SIZE_EMBED_DIM
from .models.t2i_adapter import UNSHUFFLE, XL_UNSHUFFLE, T2IAdapter
from .models.taesd import TinyDecoder
from .models.upscaler import CompactUpscaler
from .models.wordpiece import WordPieceTokenizer

UNET, VAE = "model.diffusion_model.", "first_stage_model."
TEXT_OPENAI, TEXT_OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
DEFAULT_MODEL = Path(__file__).parent / "data" / "plainsd-base.safetensors"
GENERATION_DEFAULTS = ("steps", "sampler", "schedule", "cfg_scale", "guidance_until", "width", "height", "negative_prompt")
# A model's recommendations may carry a second set, "with_lora": a LoRA beside the model (by name) and the settings
# it is run with (the shipped model's LCM-LoRA and its 4 LCM steps); pipeline.model_recommendations says when.
WITH_LORA_DEFAULTS = ("lora", "steps", "sampler", "schedule", "cfg_scale", "guidance_until")

# What SD-Turbo (adversarial diffusion distillation, SD 2.1 at 512) is run with where a request leaves it out: its
# model card's single step without guidance, and the sampler A1111 users run it with (Euler a, SGM Uniform).
TURBO_DEFAULTS = {"steps": 1, "sampler": "Euler a", "schedule": "sgm_uniform", "cfg_scale": 1.0, "width": 512,
                  "height": 512}
# What SDXL-Lightning (progressive adversarial distillation, SDXL at 1024) is run with: its model card's Euler on
# trailing timesteps without guidance, for the number of steps the file was distilled to (its name says, e.g.
# sdxl_lightning_4step.safetensors; 4 where it does not)
LIGHTNING_DEFAULTS = {"steps": 4, "sampler": "Euler", "schedule": "trailing", "cfg_scale": 1.0}
# plainsd's names of what a UNet predicts -> diffusers' scheduler prediction_type
DIFFUSERS_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# Stability's own layout (sgm, as sd_turbo.safetensors is stored): the SD 2.x text encoder under this prefix
SGM_TEXT_OPENCLIP = "conditioner.embedders.0.model."
SDXL_TEXT = "conditioner.embedders."  # SDXL's text towers: N.transformer. (CLIP-L), N.model. (OpenCLIP bigG)

# Tensors that original checkpoints carry besides the three networks: the training noise schedule,
# EMA copies (used only with ema=True), tokenizer position ids, OpenCLIP's temperature.
_IGNORED = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|v_pred|model_ema\..*"
    r"|(cond_stage_model|conditioner\.embedders\.\d+)\.(transformer|model)\.text_model\.embeddings\.position_ids"
    r"|(cond_stage_model|conditioner\.embedders\.\d+)\.model\.(logit_scale|attn_mask)"
    r"|first_stage_model\.loss\..*|denoiser\.sigmas)$"
)


class CheckpointError(ValueError):
    """A file or folder that is not a Stable Diffusion checkpoint plainsd can load."""


def _few(keys, n: int = 4) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# --- reading tensors ------------------------------------------------------------------------------

@dataclasses.dataclass
class TensorSource:
    """The tensors of a file: names and shapes at once, values on demand (memory-mapped where possible)."""
    shapes: dict[str, tuple]
    get: Callable[[str], torch.Tensor]
    metadata: dict[str, str]


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and struct.unpack("<Q", head[:8])[0] < 100_000_000 and head[8:9] == b"{"


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _SafetensorsReader:
    """Reads one tensor at a time from a .safetensors file with plain file reads.

    Not memory-mapped on purpose: the pages of a mapped file count as the process's resident memory
    until the mapping closes, so loading a 2 GB fp16 checkpoint into bf16 weights would peak at the
    file plus the weights; read this way it peaks at the weights plus one tensor."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(n))
        self.start = 8 + n

    def __call__(self, key: str) -> torch.Tensor:
        info = self.header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path.name}: tensor {key} has dtype {info['dtype']}, which plainsd does not read")
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            f.readinto(buf)
        if not buf:
            return torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
        return torch.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class _LightningCallback:
    """Stands in for PyTorch Lightning's ModelCheckpoint class, which old Lightning pickled by reference (as a dict
    key of "callbacks") into training checkpoints such as the original SD 1.x .ckpt files: only ever a name here,
    never called."""


def _pickle_allowlist() -> list:
    """What weights_only may read besides torch's own types, as A1111's safe unpickler (modules/safe.py) allows it
    in .ckpt files: the Lightning class above, and numpy scalars and dtypes (a step count, a score)."""
    import numpy
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # (numpy before 1.26)
        from numpy.core.multiarray import scalar
    kinds = ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64")
    return [(_LightningCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
            (scalar, "numpy.core.multiarray.scalar"), (numpy.dtype, "numpy.dtype"),
            *{type(numpy.dtype(kind)) for kind in kinds}]  # (the dtypes' own classes, which unpickling builds)


def read_tensors(path: str | os.PathLike) -> TensorSource:
    """Open a .safetensors file (memory-mapped) or a .ckpt/.pt/.bin file (weights_only, never unpickling code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if path.stat().st_size < 9:
        raise CheckpointError(f"{path} is not a checkpoint: the file is only {path.stat().st_size} bytes long")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        try:
            f = safe_open(str(path), framework="pt")  # checks the header, offsets and size
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
            del f
            return TensorSource(shapes, _SafetensorsReader(path), metadata)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers and sizes
            raise CheckpointError(f"{path} is not a readable .safetensors file (truncated or not a checkpoint): {e}") from None
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"PK":
        raise CheckpointError(f"{path} is not a checkpoint: expected a .safetensors file, a PyTorch .ckpt/.pt file "
                              "or a diffusers folder")
    try:
        with torch.serialization.safe_globals(_pickle_allowlist()):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path} holds pickled Python objects other than tensors{what}, which could run code: "
                              "plainsd loads .ckpt files only with weights_only=True and never runs pickled code; ask "
                              "for a .safetensors file, or if you trust this one, re-save its state_dict with "
                              "torch.save elsewhere") from None
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return TensorSource({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__, {})


# --- the text tower in OpenCLIP's layout (SD2) --------------------------------------------------

_OPENCLIP_NAMES = [  # (plainsd / transformers name, OpenCLIP name), per layer where {i} appears
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_model.encoder.layers.{i}.layer_norm1.", "transformer.resblocks.{i}.ln_1."),
    ("text_model.encoder.layers.{i}.layer_norm2.", "transformer.resblocks.{i}.ln_2."),
    ("text_model.encoder.layers.{i}.self_attn.out_proj.", "transformer.resblocks.{i}.attn.out_proj."),
    ("text_model.encoder.layers.{i}.mlp.fc1.", "transformer.resblocks.{i}.mlp.c_fc."),
    ("text_model.encoder.layers.{i}.mlp.fc2.", "transformer.resblocks.{i}.mlp.c_proj."),
]


def _openclip_rename(name: str, to_openclip: bool) -> str | None:
    m = re.search(r"(?:layers|resblocks)\.(\d+)\.", name)
    i = m.group(1) if m else None
    for ours, theirs in _OPENCLIP_NAMES:
        src, dst = (ours, theirs) if to_openclip else (theirs, ours)
        if "{i}" in src:
            if i is None:
                continue
            src, dst = src.format(i=i), dst.format(i=i)
        if name == src or (src.endswith(".") and name.startswith(src)):
            return dst + name[len(src):]
    return None


def text_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """plainsd text-encoder state -> OpenCLIP keys (q/k/v fused into in_proj, projection transposed)."""
    out = {}
    for name, t in state.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", name)
        if m:
            i, kind = m.groups()
            parts = [state[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts, 0)
        elif re.search(r"self_attn\.[kv]_proj\.", name):
            continue
        elif name == "text_projection.weight":
            out["text_projection"] = t.t().contiguous()
        else:
            out[_openclip_rename(name, to_openclip=True)] = t
    return out


def text_from_openclip(shapes: dict[str, tuple]) -> dict[str, tuple[str, Callable]]:
    """OpenCLIP key shapes -> {plainsd name: (source key, how to take the tensor from it)}."""
    plan = {}
    for key, shape in shapes.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
        if m:
            i, kind = m.groups()
            width = shape[0] // 3
            for j, p in enumerate("qkv"):
                plan[f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}"] = (key, lambda t, j=j, w=width: t[j * w:(j + 1) * w])
        elif key == "text_projection":
            plan["text_projection.weight"] = (key, lambda t: t.t())
        else:
            name = _openclip_rename(key, to_openclip=False)
            plan[name if name else "?" + key] = (key, lambda t: t)
    return plan


# --- the diffusers folder layout ------------------------------------------------------------------

_UNET_RES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
             ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_VAE_RES = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"), ("conv_shortcut", "nin_shortcut")]
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
             ("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out")]  # older diffusers names


def unet_diffusers_names(cfg: UNetConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs for a UNet of this config."""
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    if cfg.time_cond_proj_dim > 0:  # an LCM's guidance-scale projection keeps diffusers' name (models/unet.py)
        pairs.append(("time_embedding.cond_proj.", "time_embedding.cond_proj."))
    if cfg.adm_in_channels > 0:  # SDXL's embedding of pooled text and sizes (diffusers' text_time)
        pairs += [("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]

    def res(d: str, o: str):
        pairs.extend((f"{d}{a}.", f"{o}{b}.") for a, b in _UNET_RES)

    n_levels, per = len(cfg.channel_mult), cfg.num_res_blocks + 1
    for i in range(n_levels):
        for j in range(cfg.num_res_blocks):
            res(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * per + j}.0.")
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * per + j}.1."))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per}.0.op."))
    res("mid_block.resnets.0.", "middle_block.0.")
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    res("mid_block.resnets.1.", "middle_block.2.")
    for i in range(n_levels):
        has_attn = (n_levels - 1 - i) in cfg.attention_levels
        for j in range(per):
            res(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per + j}.0.")
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * per + j}.1."))
        pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * per + per - 1}.{2 if has_attn else 1}.conv."))
    return pairs


def vae_diffusers_names(cfg: VAEConfig) -> list[tuple[str, str]]:
    pairs = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    n_levels = len(cfg.ch_mult)
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in.", f"{part}.conv_in."), (f"{part}.conv_out.", f"{part}.conv_out."),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.")]
        for k, block in enumerate(("block_1", "block_2")):
            pairs += [(f"{part}.mid_block.resnets.{k}.{a}.", f"{part}.mid.{block}.{b}.") for a, b in _VAE_RES]
        pairs += [(f"{part}.mid_block.attentions.0.{a}.", f"{part}.mid.attn_1.{b}.") for a, b in _VAE_ATTN]
    for i in range(n_levels):
        for j in range(cfg.num_res_blocks + 1):
            pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.{a}.", f"encoder.down.{i}.block.{j}.{b}.") for a, b in _VAE_RES]
            pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.{a}.", f"decoder.up.{n_levels - 1 - i}.block.{j}.{b}.")
                      for a, b in _VAE_RES]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n_levels - 1 - i}.upsample.conv."))
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    best = max((p for p in pairs if key.startswith(p[0])), key=lambda p: len(p[0]), default=None)
    return best[1] + key[len(best[0]):] if best else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _component_file(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no weights file in {folder} (expected diffusion_pytorch_model.safetensors or model.safetensors)")


def _diffusers_unet_config(u: dict) -> UNetConfig:
    """A diffusers UNet2DConditionModel's (or ControlNetModel's: no out_channels) config.json as a UNetConfig."""
    boc = list(u["block_out_channels"])
    heads = u.get("num_attention_heads") or u.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(boc)
    attention = tuple(i for i, b in enumerate(u["down_block_types"]) if "CrossAttn" in b)
    # (the levels with attention, and the middle block, which has the last level's heads)
    head_dims = {c // h for i, (c, h) in enumerate(zip(boc, heads)) if i in attention or i == len(boc) - 1}
    per_level = isinstance(u.get("num_attention_heads") or u.get("attention_head_dim"), (list, tuple))
    num_heads, head_dim = (-1, head_dims.pop()) if per_level and len(head_dims) == 1 else (heads[-1], -1)
    return UNetConfig(
        in_channels=u["in_channels"], out_channels=u.get("out_channels", u["in_channels"]), model_channels=boc[0],
        channel_mult=tuple(c // boc[0] for c in boc), num_res_blocks=u["layers_per_block"],
        attention_levels=attention, num_heads=num_heads, head_dim=head_dim, context_dim=u["cross_attention_dim"],
        transformer_depth=_depths(u.get("transformer_layers_per_block", 1), attention, len(boc)),
        use_linear_proj=bool(u.get("use_linear_projection", False)), norm_groups=u.get("norm_num_groups", 32),
        time_cond_proj_dim=u.get("time_cond_proj_dim") or 0,
        adm_in_channels=(u.get("projection_class_embeddings_input_dim") or 0) if u.get("addition_embed_type") else 0)


def _depths(depths: int | list, attention: tuple, levels: int) -> int | tuple:
    """Transformer depths (one per level, the last one also the middle block's, as diffusers and sgm count them)
    as UNetConfig holds them: one number where the middle block and every level with attention have the same, else
    one per level, 0 where a level has no attention (the last level's: the middle block's)."""
    if not isinstance(depths, (list, tuple)):
        return depths
    middle = depths[-1]
    if {depths[i] for i in attention} <= {middle}:
        return middle
    return tuple(middle if i == levels - 1 else (d if i in attention else 0) for i, d in enumerate(depths))


def _check_text_time(u: dict, label: str) -> None:
    """A diffusers UNet's or ControlNet's config.json adds no vector to the timestep embedding (SD 1.x / 2.x), or
    SDXL's (addition_embed_type text_time, each size embedded by SIZE_EMBED_DIM sinusoids)."""
    kind = u.get("addition_embed_type")
    if kind not in (None, "text_time"):
        raise CheckpointError(f"{label} has addition_embed_type={kind!r}; plainsd runs SD 1.x / 2.x (none) and SDXL "
                              "(text_time) networks")
    if kind and u.get("addition_time_embed_dim", SIZE_EMBED_DIM) != SIZE_EMBED_DIM:
        raise CheckpointError(f"{label} embeds each size with {u['addition_time_embed_dim']} sinusoids; SDXL's take "
                              f"{SIZE_EMBED_DIM}")


def _diffusers_config(root: Path) -> ModelConfig:
    u = _read_json(root / "unet" / "config.json")
    v = _read_json(root / "vae" / "config.json")
    for field in ("class_embed_type", "encoder_hid_dim"):
        if u.get(field):
            raise CheckpointError(f"{root} is not an SD 1.x/2.x or SDXL model (its UNet has {field}={u[field]!r}; "
                                  "other UNet variants are not supported)")
    _check_text_time(u, f"{root}: its UNet")
    sdxl = u.get("addition_embed_type") == "text_time"
    unet = _diffusers_unet_config(u)
    vboc = list(v["block_out_channels"])
    vae = VAEConfig(in_channels=v.get("in_channels", 3), ch=vboc[0], ch_mult=tuple(c // vboc[0] for c in vboc),
                    num_res_blocks=v["layers_per_block"], z_channels=v["latent_channels"],
                    norm_groups=v.get("norm_num_groups", 32))
    sched = root / "scheduler" / "scheduler_config.json"
    prediction = "eps"
    if sched.is_file():
        named = _read_json(sched).get("prediction_type")
        prediction = {v: k for k, v in DIFFUSERS_PREDICTIONS.items()}.get(named, "eps")
    config = ModelConfig(unet=unet, vae=vae, prediction=prediction, scale_factor=v.get("scaling_factor", 0.18215),
                         resolution=v.get("sample_size", 512))
    if sdxl:
        towers = [_hf_text_config(_read_json(root / part / "config.json"), part) for part in _diffusers_text_parts(root, True)]
        config.text, config.text2 = towers[0], (towers[1] if len(towers) == 2 else None)
        config.sdxl = "base" if len(towers) == 2 else "refiner"
        return config
    pad = "eot"
    special = root / "tokenizer" / "special_tokens_map.json"
    if special.is_file():
        p = _read_json(special).get("pad_token")
        p = p.get("content") if isinstance(p, dict) else p
        pad = "eot" if p in (None, "<|endoftext|>") else "zero"
    config.text = dataclasses.replace(_hf_text_config(_read_json(root / "text_encoder" / "config.json")), pad=pad)
    return config


def _hf_text_config(t: dict, sdxl_part: str | None = None) -> TextConfig:
    """A transformers CLIPTextConfig's config.json as a TextConfig; for an SDXL tower (sdxl_part: text_encoder is
    CLIP-L, text_encoder_2 bigG with its projection) SDXL's way of reading it and its tokenizer's padding."""
    openclip = t.get("hidden_act") == "gelu"
    text = TextConfig(vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"], width=t["hidden_size"],
                      layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                      mlp_ratio=t["intermediate_size"] / t["hidden_size"], act=t.get("hidden_act", "quick_gelu"),
                      clip_skip=1, layout="openclip" if openclip else "openai")
    if sdxl_part is None:
        return text
    projection = t.get("projection_dim", t["hidden_size"]) if sdxl_part == "text_encoder_2" else 0
    return dataclasses.replace(text, clip_skip=2, final_norm=False, pad="zero" if openclip else "eot",
                               projection_dim=projection)


def _diffusers_text_parts(root: Path, sdxl: bool) -> list[str]:
    """The folder's text encoders: text_encoder (SD1/SD2), or SDXL's text_encoder (CLIP-L) and text_encoder_2
    (bigG; the refiner has it alone)."""
    if not sdxl:
        return ["text_encoder"]
    parts = [part for part in ("text_encoder", "text_encoder_2") if (root / part / "config.json").is_file()]
    if "text_encoder_2" not in parts:
        raise CheckpointError(f"{root} is an SDXL folder without text_encoder_2/config.json (its OpenCLIP ViT-bigG "
                              "text encoder, which the base model and the refiner both have)")
    return parts


def _read_diffusers(root: Path) -> tuple[ModelConfig, TensorSource]:
    """A diffusers folder as one TensorSource in the original single-file layout (the text encoders' tensors under
    their towers' prefixes with transformers' names, which plainsd's modules have: load reads them as they are)."""
    for part in ("unet", "vae"):
        if not (root / part / "config.json").is_file():
            raise CheckpointError(f"{root} is not a diffusers model folder: {part}/config.json is missing")
    if not any((root / part / "config.json").is_file() for part in ("text_encoder", "text_encoder_2")):
        raise CheckpointError(f"{root} is not a diffusers model folder: text_encoder/config.json is missing")
    config = _diffusers_config(root)
    shapes, getters, metadata = {}, {}, {}
    tables = {"unet": (unet_diffusers_names(config.unet), UNET), "vae": (vae_diffusers_names(config.vae), VAE)}
    text_parts = _diffusers_text_parts(root, bool(config.sdxl))
    prefixes = dict(zip(text_parts, [tower[0] for tower in text_towers(config)]))
    for part in ("unet", "vae", *text_parts):
        src = read_tensors(_component_file(root / part))
        if part == "unet":  # the folder's metadata (save_diffusers keeps a single file's there)
            metadata = src.metadata
        for key, shape in src.shapes.items():
            if part in prefixes:
                name = prefixes[part] + key
            else:
                pairs, prefix = tables[part]
                new = _rename(key, pairs)
                name = prefix + new if new else f"{part}/{key}"  # left unrenamed: reported as unexpected
            shapes[name] = shape
            getters[name] = (src.get, key)
    source = TensorSource(shapes, lambda name: getters[name][0](getters[name][1]), metadata)
    return config, source


def text_towers(config: ModelConfig) -> list[tuple[str, str, bool]]:
    """(file prefix, module prefix, OpenCLIP layout) of each text tower of a model in an original single file:
    SD1's and SD2's under cond_stage_model., SDXL's under conditioner.embedders.N. (N.transformer: CLIP-L in
    transformers' names; N.model: OpenCLIP bigG in OpenCLIP's)."""
    if not config.sdxl:
        openclip = config.text.layout == "openclip"
        return [(TEXT_OPENCLIP if openclip else TEXT_OPENAI, "text_encoder.", openclip)]
    towers = []
    for i, cfg in enumerate([config.text] + ([config.text2] if config.text2 is not None else [])):
        openclip = cfg.layout == "openclip"
        name = f"{i}.{'model' if openclip else 'transformer'}."
        towers.append((SDXL_TEXT + name, "text_encoder.embedders." + name, openclip))
    return towers


# --- recognising a single file's model from its tensors ----------------------------------------

def infer_config(shapes: dict[str, tuple], metadata: dict[str, str]) -> tuple[ModelConfig, str | None]:
    """The ModelConfig of an original-layout checkpoint: from plainsd's metadata, else from tensor shapes.

    Also returns the key of the tensor whose spread tells v-prediction apart, where that test applies.
    """
    if "plainsd.config" in metadata:
        try:
            return ModelConfig.from_dict(json.loads(metadata["plainsd.config"])), None
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"the file's plainsd.config metadata is unreadable: {e}") from None
    keys = set(shapes)
    if UNET + "input_blocks.0.0.weight" not in keys:
        if any(k.startswith(SDXL_TEXT) for k in keys):
            raise CheckpointError(f"not a whole SDXL checkpoint: it has text encoder tensors ({SDXL_TEXT}*) but no "
                                  f"UNet ({UNET}*)")
        lora = any("lora_" in k for k in list(keys)[:50])
        kind = " (it looks like a LoRA file)" if lora else ""
        raise CheckpointError(f"not a Stable Diffusion checkpoint{kind}: it has no {UNET}* tensors; "
                              f"its first keys are {_few(keys)}")

    unet = _unet_config(shapes)
    prediction = "v" if "v_pred" in keys else "eps"
    if unet.adm_in_channels > 0:
        return _sdxl_config(shapes, unet, prediction), None
    sd2_unet = unet.head_dim > 0
    text, vae = _text_config(shapes), _vae_config(shapes)
    # SD 2.x 768 models are v-prediction but nothing in the file says so; like ComfyUI, look at the
    # spread of one LayerNorm bias that v-training moves (override with load(..., prediction=...)).
    key = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    v_test = sd2_unet and unet.in_channels == 4 and key in keys
    return ModelConfig(text=text, unet=unet, vae=vae, prediction=prediction, resolution=768 if sd2_unet else 512), (key if v_test else None)


def _sdxl_config(shapes: dict[str, tuple], unet: UNetConfig, prediction: str) -> ModelConfig:
    """An SDXL file's config: its text towers under conditioner.embedders.N. (CLIP-L and bigG: the base model;
    bigG alone: the refiner), read as SDXL reads them, their states as wide as the UNet's context."""
    keys, towers = set(shapes), []
    for i in range(2):
        for name, openclip in (("transformer.", False), ("model.", True)):
            prefix = f"{SDXL_TEXT}{i}.{name}"
            if any(k.startswith(prefix) for k in keys):
                text = _openclip_text_config(shapes, prefix) if openclip else _openai_text_config(shapes, prefix)
                towers.append(dataclasses.replace(text, clip_skip=2, final_norm=False))
    if not towers or towers[-1].layout != "openclip" or (len(towers) == 2 and towers[0].layout != "openai"):
        raise CheckpointError(f"not a whole SDXL checkpoint: its text encoders are not CLIP-L and OpenCLIP bigG (or "
                              f"bigG alone, the refiner) under {SDXL_TEXT}0. and 1.; found {len(towers)}")
    width = sum(t.width for t in towers)
    if width != unet.context_dim:
        raise CheckpointError(f"this SDXL checkpoint's text encoders give states {width} wide, but its UNet reads "
                              f"{unet.context_dim}")
    return ModelConfig(text=towers[0], text2=towers[1] if len(towers) == 2 else None, unet=unet, vae=_vae_config(shapes),
                       prediction=prediction, scale_factor=0.13025, resolution=1024,
                       sdxl="base" if len(towers) == 2 else "refiner")


def _unet_config(shapes: dict[str, tuple], prefix: str = UNET) -> UNetConfig:
    """The UNet's config from its tensors' names and shapes: levels, ResBlocks per level, attention, text width.
    Only the way down and the middle are read, so a ControlNet's tensors (prefix "") give its config too."""
    keys = set(shapes)
    u = lambda k: shapes.get(prefix + k)  # noqa: E731
    mc = u("input_blocks.0.0.weight")[0]
    blocks: dict[int, set[str]] = {}
    for k in keys:
        m = re.match(re.escape(prefix) + r"input_blocks\.(\d+)\.(\d+)\.(\w+)", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(f"{m.group(2)}.{m.group(3)}")
    mults, levels_attn, counts, count, depths = [], [], [], 0, []
    for i in range(1, max(blocks) + 1):
        parts = blocks.get(i, set())
        if "0.op" in parts:
            counts.append(count)
            count = 0
            continue
        if count == 0:
            mults.append(u(f"input_blocks.{i}.0.out_layers.3.weight")[0] // mc)
            depths.append(_blocks_in(keys, f"{prefix}input_blocks.{i}.1."))
            if any(p.startswith("1.") for p in parts):
                levels_attn.append(len(mults) - 1)
        count += 1
    counts.append(count)
    if len(set(counts)) != 1:
        raise CheckpointError(f"unsupported UNet layout: {counts} ResBlocks per level (plainsd expects the same number on every level)")
    proj_in = u("middle_block.1.proj_in.weight")
    context_dim = u("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    depth = _blocks_in(keys, prefix + "middle_block.1.")
    sd2_unet = context_dim == 1024 or (proj_in is not None and len(proj_in) == 2)
    in_channels, out = u("input_blocks.0.0.weight")[1], u("out.2.weight")  # (a ControlNet has no way up: no out)
    guidance = u("time_embedding.cond_proj.weight")  # LCM-distilled: [model_channels, time_cond_proj_dim]
    label = u("label_emb.0.0.weight")  # SDXL: [time embedding width, adm_in_channels]
    return UNetConfig(in_channels=in_channels, out_channels=out[0] if out else in_channels, model_channels=mc,
                      channel_mult=tuple(mults), num_res_blocks=counts[0], attention_levels=tuple(levels_attn),
                      num_heads=-1 if sd2_unet else 8, head_dim=64 if sd2_unet else -1, context_dim=context_dim,
                      transformer_depth=_depths(depths[:-1] + [max(depth, 1)], tuple(levels_attn), len(mults)),
                      use_linear_proj=proj_in is not None and len(proj_in) == 2,
                      time_cond_proj_dim=guidance[1] if guidance else 0, adm_in_channels=label[1] if label else 0)


def _blocks_in(keys: set[str], transformer: str) -> int:
    """How many transformer blocks the SpatialTransformer under this key prefix has (0: none there)."""
    return len({k for k in keys if k.startswith(transformer + "transformer_blocks.") and k.endswith("attn1.to_q.weight")})


def _text_config(shapes: dict[str, tuple]) -> TextConfig:
    """The text encoder's config: OpenCLIP's names (SD 2.x) or OpenAI CLIP's in transformers' layout (SD 1.x)."""
    keys = set(shapes)
    if any(k.startswith(TEXT_OPENCLIP) for k in keys):
        return dataclasses.replace(_openclip_text_config(shapes, TEXT_OPENCLIP), clip_skip=2)
    if any(k.startswith(TEXT_OPENAI) for k in keys):
        return _openai_text_config(shapes, TEXT_OPENAI)
    raise CheckpointError(f"not a full Stable Diffusion checkpoint: it has no text encoder tensors "
                          f"({TEXT_OPENAI}* or {TEXT_OPENCLIP}*)")


def _openclip_text_config(shapes: dict[str, tuple], p: str) -> TextConfig:
    """An OpenCLIP text tower's config from its tensors under the prefix p (heads: CLIP's head size, 64)."""
    vocab, width = shapes[p + "token_embedding.weight"]
    layers = len({k[len(p):].split(".")[2] for k in shapes if k.startswith(p + "transformer.resblocks.")})
    mlp = shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"][0]
    return TextConfig(vocab_size=vocab, context_length=shapes[p + "positional_embedding"][0], width=width, layers=layers,
                      heads=max(width // 64, 1), mlp_ratio=mlp / width, act="gelu", layout="openclip", pad="zero",
                      projection_dim=shapes[p + "text_projection"][1] if p + "text_projection" in shapes else 0)


def _openai_text_config(shapes: dict[str, tuple], prefix: str) -> TextConfig:
    """An OpenAI CLIP text tower's config from its tensors (transformers' names) under the prefix."""
    p = prefix + "text_model."
    vocab, width = shapes[p + "embeddings.token_embedding.weight"]
    layers = len({k[len(p):].split(".")[2] for k in shapes if k.startswith(p + "encoder.layers.")})
    mlp = shapes[p + "encoder.layers.0.mlp.fc1.weight"][0]
    proj = shapes.get(prefix + "text_projection.weight")
    return TextConfig(vocab_size=vocab, context_length=shapes[p + "embeddings.position_embedding.weight"][0], width=width,
                      layers=layers, heads=max(width // 64, 1), mlp_ratio=mlp / width, projection_dim=proj[0] if proj else 0)


def _vae_config(shapes: dict[str, tuple]) -> VAEConfig:
    keys = set(shapes)
    if VAE + "encoder.conv_in.weight" not in keys:
        raise CheckpointError(f"not a full Stable Diffusion checkpoint: it has no VAE tensors ({VAE}*)")
    ch = shapes[VAE + "encoder.conv_in.weight"][0]
    n_levels = len({k.split(".")[3] for k in keys if k.startswith(VAE + "encoder.down.")})
    return VAEConfig(in_channels=shapes[VAE + "encoder.conv_in.weight"][1], ch=ch,
                     ch_mult=tuple(shapes[VAE + f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(n_levels)),
                     num_res_blocks=len({k.split(".")[5] for k in keys if k.startswith(VAE + "encoder.down.0.block.")}),
                     z_channels=shapes[VAE + "post_quant_conv.weight"][0])


def _v_by_weights(source: TensorSource, key: str | None) -> bool:
    return key is not None and float(source.get(key).float().std(unbiased=False)) > 0.09


# --- the public functions -------------------------------------------------------------------------

def original_state_dict(sd: StableDiffusion) -> dict[str, torch.Tensor]:
    """The model's tensors under the original single-file keys."""
    out = {UNET + k: v for k, v in sd.unet.state_dict().items()}
    out.update({VAE + k: v for k, v in sd.vae.state_dict().items()})
    text = {"text_encoder." + k: v for k, v in sd.text_encoder.state_dict().items()}
    for file_prefix, module_prefix, openclip in text_towers(sd.config):
        tower = {k[len(module_prefix):]: v for k, v in text.items() if k.startswith(module_prefix)}
        out.update({file_prefix + k: v for k, v in (text_to_openclip(tower) if openclip else tower).items()})
    return out


def _source_plan(config: ModelConfig, source: TensorSource, openclip_names: bool = True) -> dict[str, tuple[str, Callable]]:
    """{plainsd state-dict name: (source key, transform)} for every network tensor in the source.
    openclip_names: OpenCLIP towers have OpenCLIP's names (a single file), else transformers' (a diffusers folder)."""
    plan, direct = {}, [(UNET, "unet."), (VAE, "vae.")]
    for file_prefix, module_prefix, openclip in text_towers(config):
        if not (openclip and openclip_names):
            direct.append((file_prefix, module_prefix))
            continue
        tower = {k[len(file_prefix):]: s for k, s in source.shapes.items() if k.startswith(file_prefix)}
        for name, (key, fn) in text_from_openclip(tower).items():
            plan[module_prefix + name] = (file_prefix + key, fn)
    converted = {key for key, _ in plan.values()}
    for key in source.shapes:
        if _IGNORED.match(key) or key in converted:
            continue
        for prefix, part in direct:
            if key.startswith(prefix):
                plan[part + key[len(prefix):]] = (key, lambda t: t)
                break
        else:
            plan["?" + key] = (key, lambda t: t)
    return plan


def _ema_key(key: str) -> str:
    # LDM stores EMA weights as model_ema.<name without "model." and without dots>.
    return "model_ema." + key[len("model."):].replace(".", "")


def load(path: str | os.PathLike | None = None, *, prediction: str | None = None, ema: bool = False,
         dtype: torch.dtype = torch.float32, share_with: StableDiffusion | None = None) -> StableDiffusion:
    """Load a checkpoint: an original single file (.safetensors, .ckpt) or a diffusers folder.

    prediction: "eps", "v" or "x0" overrides what the file suggests (SD 2.x 768 models are "v", SDXL-Lightning's
    1-step file "x0").
    ema: take the UNet's EMA weights (model_ema.*) instead of the live ones, where the file has them.
    share_with: a loaded model whose VAE and text towers this one takes instead of copies of its own where they are
    equal (_shared_parts): SDXL's refiner beside its base, whose bigG tower and VAE are the base's.
    With no path, the default model that ships with plainsd.
    """
    if path is None:
        if not DEFAULT_MODEL.is_file():
            raise CheckpointError("plainsd has no default model yet; pass a checkpoint path, or use plainsd.build('tiny') "
                                  "for a random tiny model")
        path = DEFAULT_MODEL
    path = Path(path)
    if prediction not in (None, *PREDICTIONS):
        raise ValueError(f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}")
    v_key = None
    if path.is_dir():
        config, source = _read_diffusers(path)
    elif not path.exists():
        raise CheckpointError(f"no such checkpoint file or folder: {path}")
    else:
        source = _sgm_sd2(read_tensors(path))
        config, v_key = infer_config(source.shapes, source.metadata)
        if _v_by_weights(source, v_key):
            config.prediction = "v"
    if predicts_sample(path, config):
        config.prediction = "x0"
    if prediction:
        config.prediction = prediction
    guessed = few_step_defaults(path, source, config)

    with torch.device("meta"):
        sd = StableDiffusion(config)
    expected = {k: tuple(v.shape) for k, v in sd.state_dict().items()}
    plan = _source_plan(config, source, openclip_names=not path.is_dir())
    if ema:
        for name, (key, fn) in plan.items():
            if name.startswith("unet."):
                if _ema_key(key) not in source.shapes:
                    raise CheckpointError(f"{path.name} has no EMA weights for {key} (expected {_ema_key(key)}); load it with ema=False")
                plan[name] = (_ema_key(key), fn)

    missing = sorted({_original_name(k, config, not path.is_dir()) for k in expected if k not in plan})
    unexpected = [plan[k][0] for k in plan if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({_few(unexpected)})")
    if problems:
        raise CheckpointError(f"{path.name} does not fit the {_describe(config)} model it looks like: " + "; ".join(problems))

    shared = _shared_parts(path, config, plan, expected, source, dtype, share_with) if share_with is not None else {}
    state, misshaped = {}, []
    for name, want in expected.items():
        if name.startswith(tuple(part + "." for part in shared)):
            continue
        tensor = _planned(path, plan[name], source, want)
        if tuple(tensor.shape) != want:
            misshaped.append(f"{plan[name][0]}: file {list(tensor.shape)}, model {list(want)}")
            continue
        state[name] = tensor.to(dtype).contiguous()
    if misshaped:
        raise CheckpointError(f"{path.name} does not fit the {_describe(config)} model it looks like: "
                              f"{len(misshaped)} tensors have the wrong shape ({'; '.join(misshaped[:4])})")
    sd.load_state_dict(state, strict=not shared, assign=True)  # (the shared parts' tensors: the other model's)
    for part, module in shared.items():
        sd.set_submodule(part, module)
    sd.name = path.stem if path.is_file() else path.name
    tiny = path.with_suffix(".taesd.safetensors") if path.is_file() else path / "taesd_decoder.safetensors"
    if tiny.is_file():
        sd.tiny_decoder_path = tiny  # fast mode's decoder, loaded when first used
    sd.defaults = _own_defaults(source, sd.defaults) if "plainsd.defaults" in source.metadata else guessed
    return sd.eval().requires_grad_(False)


def _planned(path: Path, planned: tuple[str, Callable], source: TensorSource, want: tuple) -> torch.Tensor:
    """A model tensor as the plan makes it from the file, in the file's dtype (its shape may not be `want`)."""
    key, fn = planned
    tensor = fn(source.get(key))
    as_conv = len(want) == 4 and want[2:] == (1, 1) and tensor.numel() == torch.Size(want).numel()
    if tuple(tensor.shape) != want and as_conv:
        tensor = tensor.reshape(want)  # attention projections stored as Linear instead of 1x1 Conv
    if not tensor.is_floating_point():
        raise CheckpointError(f"{path.name}: tensor {key} is {tensor.dtype}, expected floating point weights")
    return tensor


def _shared_parts(path: Path, config: ModelConfig, plan: dict, expected: dict, source: TensorSource,
                  dtype: torch.dtype, other: StableDiffusion) -> dict[str, torch.nn.Module]:
    """Module path -> the other model's module, for each part of the file's model that the other holds equal: its
    VAE, and a text tower of the same config (the refiner's bigG, embedders.0.model, is the base's embedders.1.model).
    Equal: the same tensor names and every tensor, as loaded in dtype, equal to the other's in value and dtype (or
    its float32, which fp16 storage keeps for biases and norms: runtime/storage.py). Compared a tensor at a time
    from the file, stopping at the first difference, so a part that is shared is never held twice."""
    wider = {torch.float16: torch.float32}.get(dtype, dtype)
    shared = {}
    for part, module in _common_parts(config, other):
        theirs = module.state_dict()  # (packed layers give plain copies: runtime/packing.py)
        names = [n for n in expected if n.startswith(part + ".")]
        if len(names) != len(theirs):
            continue
        for name in names:
            mine, their = _planned(path, plan[name], source, expected[name]), theirs.get(name[len(part) + 1:])
            if (their is None or their.dtype not in (dtype, wider) or mine.shape != their.shape
                    or not torch.equal(mine.to(dtype).to(their.dtype), their)):
                break
        else:
            shared[part] = module
    return shared


def _common_parts(config: ModelConfig, other: StableDiffusion) -> list[tuple[str, torch.nn.Module]]:
    """(module path in a model of this config, the other model's module) for the parts two models may share: the
    VAE, and each text tower with a tower of the same config."""
    pairs = [("vae", other.vae)] if config.vae == other.config.vae else []
    mine = [c for c in (config.text, config.text2) if c is not None]
    theirs = [c for c in (other.config.text, other.config.text2) if c is not None]
    for (_, prefix, _), cfg in zip(text_towers(config), mine):
        same = [tower for their_cfg, tower in zip(theirs, other.text_towers) if their_cfg == cfg]
        if same:
            pairs.append((prefix.rstrip("."), same[0]))
    return pairs


def read_config(path: str | os.PathLike | None = None) -> ModelConfig:
    """The ModelConfig load() would build for a checkpoint file or diffusers folder, from its header or config
    files alone (no weights read): what runtime.choose_dtype needs to pick the dtype to load it in."""
    path = Path(path) if path is not None else DEFAULT_MODEL
    if path.is_dir():
        return _diffusers_config(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint file or folder: {path}")
    source = _sgm_sd2(read_tensors(path))
    config = infer_config(source.shapes, source.metadata)[0]
    if predicts_sample(path, config):
        config.prediction = "x0"
    return config


def _own_defaults(source: TensorSource, unreadable: dict) -> dict:
    """A file's own plainsd.defaults metadata (the settings GENERATION_DEFAULTS names, and a with_lora set of those
    WITH_LORA_DEFAULTS names, its LoRA and sampler named); `unreadable` where they are not JSON: defaults are a
    convenience, and a file with unreadable ones still loads."""
    try:
        defaults = json.loads(source.metadata["plainsd.defaults"])
        own = {k: v for k, v in defaults.items() if k in GENERATION_DEFAULTS}
        with_lora = defaults.get("with_lora")
        if isinstance(with_lora, dict) and all(isinstance(with_lora.get(k), str) for k in ("lora", "sampler")):
            own["with_lora"] = {k: v for k, v in with_lora.items() if k in WITH_LORA_DEFAULTS}
        return own
    except (json.JSONDecodeError, AttributeError):
        return unreadable


def few_step_defaults(path: Path, source: TensorSource, config: ModelConfig) -> dict:
    """The settings a distilled few-step checkpoint runs with where a request leaves them out: SD-Turbo's and
    SDXL-Turbo's (TURBO_DEFAULTS), SDXL-Lightning's (LIGHTNING_DEFAULTS, its step count from its name); {} for
    any other checkpoint."""
    if is_turbo(path, source, config):
        return dict(TURBO_DEFAULTS)
    name = path.name.lower()
    if "lightning" not in name or config.sdxl != "base":  # (Lightning is distilled from SDXL base)
        return {}
    steps = re.search(r"(\d+)[-_ ]?steps?", name)
    return {**LIGHTNING_DEFAULTS, **({"steps": int(steps.group(1))} if steps else {})}


def predicts_sample(path: Path, config: ModelConfig) -> bool:
    """Whether a file is SDXL-Lightning's 1-step model (sdxl_lightning_1step_x0.safetensors), whose UNet predicts
    the clean sample (x0; diffusers' prediction_type "sample", as its model card runs it) rather than the noise: an
    SDXL base file with "lightning" and "x0" in its name (nothing in the file says so)."""
    name = path.name.lower()
    return (config.sdxl == "base" and "lightning" in name
            and re.search(r"(^|[^a-z0-9])x0([^a-z0-9]|$)", name) is not None)


def is_turbo(path: Path, source: TensorSource, config: ModelConfig | None = None) -> bool:
    """Whether a checkpoint is an adversarially distilled Turbo model: its ModelSpec metadata (modelspec.architecture
    or modelspec.title, which Stability writes: stable-diffusion-xl-turbo-v1) says turbo; or it is SD 2.x in
    Stability's sgm layout with a denoiser.sigmas tensor, as sd_turbo.safetensors is (SwarmUI's test; an SDXL file
    from sgm may carry that tensor too, so it does not count there); or its file or folder name says turbo."""
    spec = " ".join(source.metadata.get(f"modelspec.{key}", "") for key in ("architecture", "title"))
    sgm_sd2 = "denoiser.sigmas" in source.shapes and not (config is not None and config.sdxl)
    return "turbo" in spec.lower() or sgm_sd2 or "turbo" in path.name.lower()


def _sgm_sd2(source: TensorSource) -> TensorSource:
    """An SD 2.x checkpoint in Stability's sgm layout (its text encoder under conditioner.embedders.0.model.) with
    the original layout's names; any other file as it is (SDXL's files: two embedders, or a UNet with label_emb)."""
    keys = list(source.shapes)
    if (not any(k.startswith(SGM_TEXT_OPENCLIP) for k in keys) or any(k.startswith("conditioner.embedders.1.") for k in keys)
            or UNET + "label_emb.0.0.weight" in source.shapes):  # (the SDXL refiner: bigG alone, the same prefix)
        return source
    rename = {(TEXT_OPENCLIP + k[len(SGM_TEXT_OPENCLIP):] if k.startswith(SGM_TEXT_OPENCLIP) else k): k for k in keys}
    return TensorSource({new: source.shapes[old] for new, old in rename.items()}, lambda k: source.get(rename[k]),
                        source.metadata)


def _original_name(name: str, config: ModelConfig, openclip_names: bool = True) -> str:
    """The key under which a file would store plainsd's tensor `name` (for error messages)."""
    part, rest = name.split(".", 1)
    if part == "unet":
        return UNET + rest
    if part == "vae":
        return VAE + rest
    for file_prefix, module_prefix, openclip in text_towers(config):
        if not name.startswith(module_prefix):
            continue
        rest = name[len(module_prefix):]
        if not (openclip and openclip_names):
            return file_prefix + rest
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$", rest)
        if m:
            return file_prefix + f"transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(2)}"
        return file_prefix + ("text_projection" if rest == "text_projection.weight" else _openclip_rename(rest, True) or rest)
    return name


def _describe(config: ModelConfig) -> str:
    extra = ", inpainting" if config.unet.in_channels == 9 else ""
    extra += ", LCM" if config.unet.time_cond_proj_dim > 0 else ""
    return f"{family(config)}{extra}"


def save(sd: StableDiffusion, path: str | os.PathLike, dtype: torch.dtype | None = None,
         metadata: dict[str, str] | None = None) -> Path:
    """Write the model as one .safetensors file in the original layout (A1111, ComfyUI, diffusers read it).

    The file is written under a temporary name and renamed, so an interrupted save leaves no partial file.
    dtype: e.g. torch.float16 to halve the file; default: the model's own dtype.
    metadata: more header entries to keep (another file's, e.g. a merge recipe); plainsd's own entries win.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"plainsd saves .safetensors files only; got {path.name!r}")
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in original_state_dict(sd).items()}
    metadata = {**(metadata or {}), "format": "pt", "plainsd.config": sd.config.to_json(),
                "plainsd.prediction": sd.config.prediction}
    if sd.defaults:
        metadata["plainsd.defaults"] = json.dumps(sd.defaults)
    return write_safetensors(state, path, metadata)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a .safetensors file whole or not at all (a temporary file, then a rename), readable as the
    user's umask allows (safetensors alone creates files only their owner can read)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_tiny_decoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> TinyDecoder:
    """A TAESD decoder file: .safetensors (TAESD's or diffusers' AutoencoderTiny names) or .pth (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such tiny decoder file: {path}")
    source = read_tensors(path)
    state = {}
    for key in source.shapes:
        name = key
        if name.startswith("decoder.layers."):  # diffusers: the clamp is not a layer, so every index is one less
            index, _, rest = name[len("decoder.layers."):].partition(".")
            name = f"{int(index) + 1}.{rest}" if index.isdigit() else name
        elif name.startswith("decoder."):
            name = name[len("decoder."):]
        if name.split(".")[0].isdigit():
            state[name] = source.get(key)
    if "1.weight" not in state or state["1.weight"].ndim != 4:
        raise CheckpointError(f"{path.name} is not a TAESD decoder (no first convolution '1.weight' among its tensors)")
    width, latent_channels = state["1.weight"].shape[:2]
    decoder = TinyDecoder(latent_channels, width)
    expected = decoder.state_dict()
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"{path.name} does not fit a TAESD decoder of width {width}: "
                              f"{len(wrong)} tensors missing or misshaped (e.g. {wrong[0]})")
    decoder.load_state_dict({k: state[k].to(dtype) for k in expected})
    return decoder.to(dtype).eval().requires_grad_(False)


def load_upscaler(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> CompactUpscaler:
    """A Real-ESRGAN compact upscaler file whose tensors are the bare state dict (plainsd-x4, as `plainsd train
    upscaler` writes it): .safetensors or .pth (weights only); the config is read off the shapes. Other layouts and
    architectures are spandrel's to load (plainsd.upscale)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such upscaler file: {path}")
    source = read_tensors(path)
    state = {k: source.get(k) for k in source.shapes}
    if "body.0.weight" not in state or "body.1.weight" not in state or state["body.0.weight"].ndim != 4:
        raise CheckpointError(f"{path.name} is not a Real-ESRGAN compact upscaler (no body.0.weight convolution and "
                              "body.1.weight PReLU among its tensors)")
    upscaler = CompactUpscaler(CompactUpscaler.config_from_state_dict(state))
    expected = upscaler.state_dict()
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    extra = [k for k in state if k not in expected]
    if wrong or extra:
        raise CheckpointError(f"{path.name} does not fit a Real-ESRGAN compact upscaler: "
                              f"{len(wrong)} tensors missing or misshaped, {len(extra)} unknown "
                              f"(e.g. {(wrong + extra)[0]})")
    upscaler.load_state_dict({k: state[k].to(dtype) for k in expected})
    return upscaler.to(dtype).eval().requires_grad_(False)


# --- BLIP captioning folders (Hugging Face's layout) ---------------------------------------------------

# Tensors a BLIP folder may hold besides the network: the output layer that transformers ties to the word
# embeddings (and so never reads from the file), and the position ids older files stored.
_BLIP_EXTRA = re.compile(r"^text_decoder\.(cls\.predictions\.decoder\.(weight|bias)|bert\.embeddings\.position_ids)$")


def blip_config(config: dict, where: str = "config.json") -> BlipConfig:
    """The BlipConfig of a Hugging Face BLIP config.json; entries it leaves out take transformers' defaults."""
    architectures = config.get("architectures") or ["BlipForConditionalGeneration"]
    if config.get("model_type") != "blip" or "BlipForConditionalGeneration" not in architectures:
        raise CheckpointError(f"{where} is not a BLIP captioning model (model_type {config.get('model_type')!r}, "
                              f"architectures {architectures}); plainsd reads BlipForConditionalGeneration folders "
                              "such as Salesforce/blip-image-captioning-base and -large")
    v, t = config.get("vision_config") or {}, config.get("text_config") or {}
    acts = {v.get("hidden_act", "gelu"), t.get("hidden_act", "gelu")}
    if acts != {"gelu"}:
        raise CheckpointError(f"{where}: BLIP with activation {sorted(acts)} is not supported; only gelu is")
    return BlipConfig(
        image_size=v.get("image_size", 384), patch_size=v.get("patch_size", 16), vision_width=v.get("hidden_size", 768),
        vision_layers=v.get("num_hidden_layers", 12), vision_heads=v.get("num_attention_heads", 12),
        vision_hidden=v.get("intermediate_size", 3072), vision_eps=v.get("layer_norm_eps", 1e-5),
        vocab_size=t.get("vocab_size", 30524), text_width=t.get("hidden_size", 768),
        text_layers=t.get("num_hidden_layers", 12), text_heads=t.get("num_attention_heads", 8),
        text_hidden=t.get("intermediate_size", 3072), text_eps=t.get("layer_norm_eps", 1e-12),
        max_positions=t.get("max_position_embeddings", 512), bos_token_id=t.get("bos_token_id", 30522),
        sep_token_id=t.get("sep_token_id", 102), pad_token_id=t.get("pad_token_id", 0))


def load_blip(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[BlipCaptionModel, WordPieceTokenizer]:
    """A BLIP captioning folder as Hugging Face publishes it (config.json, model.safetensors or pytorch_model.bin
    read with weights_only, vocab.txt) -> the network, in eval mode, and its tokenizer."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a BLIP folder: it has no config.json")
    config = blip_config(_read_json(folder / "config.json"), str(folder / "config.json"))
    files = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
    if not files:
        raise CheckpointError(f"{folder} has no model.safetensors or pytorch_model.bin with BLIP's weights")
    if not (folder / "vocab.txt").is_file():
        raise CheckpointError(f"{folder} has no vocab.txt (BLIP's WordPiece vocabulary)")
    tokenizer = WordPieceTokenizer.from_file(folder / "vocab.txt")
    if len(tokenizer.vocab) > config.vocab_size:
        raise CheckpointError(f"{folder}: vocab.txt has {len(tokenizer.vocab)} pieces, more than the model's "
                              f"{config.vocab_size} token embeddings")
    source = read_tensors(files[0])
    model = BlipCaptionModel(config)
    expected = model.state_dict()
    state = {k: source.get(k) for k in source.shapes if not _BLIP_EXTRA.match(k)}
    wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
    extra = [k for k in state if k not in expected]
    if wrong or extra:
        raise CheckpointError(f"{files[0].name} does not fit the BLIP captioning model its config.json describes: "
                              f"{len(wrong)} tensors missing or misshaped, {len(extra)} unknown (e.g. {(wrong + extra)[0]})")
    model.load_state_dict({k: state[k].to(dtype) for k in expected})
    return model.to(dtype).eval().requires_grad_(False), tokenizer


# --- file hashes, as A1111 shows them -----------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file (hex): A1111's "sha256" of a checkpoint; its first 10 digits are the short hash
    that infotexts write as "Model hash" and "VAE hash"."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def short_hash(path: str | os.PathLike) -> str:
    """A1111's short hash of a file: the first 10 hex digits of its SHA-256."""
    return file_sha256(path)[:10]


def legacy_hash(path: str | os.PathLike) -> str:
    """A1111's old model hash (its merge recipes keep it as legacy_hash): the first 8 hex digits of the SHA-256
    of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


# --- VAE files ----------------------------------------------------------------------------------------

# What a VAE file may carry besides the VAE (A1111's load_vae_dict drops the same: the training loss's
# discriminator and the EMA bookkeeping)
_VAE_META = "plainsd.vae_config"  # what save_vae (and `plainsd train vae`) record of a VAE beside its tensors
_VAE_EXTRA = re.compile(r"^(loss\..*|model_ema\.decay|model_ema\.num_updates)$")


def vae_tensors(path: str | os.PathLike) -> tuple[VAEConfig, TensorSource]:
    """A VAE's config and its tensors under plainsd's (the original) names without a prefix, from: a VAE file in
    the original layout (vae-ft-mse-840000-ema-pruned: encoder.*, decoder.*, quant_conv.*), the same under
    first_stage_model. (a whole checkpoint's VAE too), a diffusers AutoencoderKL file, or a diffusers AutoencoderKL
    folder (config.json and its weights)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file() or _read_json(path / "config.json").get("_class_name") != "AutoencoderKL":
            raise CheckpointError(f"{path} is not a diffusers AutoencoderKL folder (its config.json is missing or "
                                  "names another class)")
        source = read_tensors(_component_file(path))
    elif path.exists():
        source = read_tensors(path)
    else:
        raise CheckpointError(f"no such VAE file or folder: {path}")
    keys = [k for k in source.shapes if not _VAE_EXTRA.match(k)]
    if any(k.startswith(VAE) for k in keys):
        keys = [k for k in keys if k.startswith(VAE)]
        names = {k[len(VAE):]: k for k in keys}
    else:
        names = {k: k for k in keys}
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in names:  # diffusers' names
        levels = len({k.split(".")[2] for k in names if k.startswith("encoder.down_blocks.")})
        blocks = len({k.split(".")[4] for k in names if k.startswith("encoder.down_blocks.0.resnets.")})
        pairs = vae_diffusers_names(VAEConfig(ch_mult=(1,) * levels, num_res_blocks=blocks))
        names = {(_rename(k, pairs) or "?" + k): key for k, key in names.items()}
    if "encoder.conv_in.weight" not in names or "post_quant_conv.weight" not in names:
        raise CheckpointError(f"{path.name} is not a VAE: it has no encoder.conv_in / post_quant_conv tensors "
                              f"(with or without {VAE}); it looks like {_looks_like(set(source.shapes))}")
    source = _renamed(source, names)
    meta = source.metadata  # plainsd's own files say what the shapes cannot (the norm groups)
    if "plainsd.config" in meta:
        return infer_config({}, meta)[0].vae, source
    if _VAE_META in meta:
        try:
            return ModelConfig.from_dict({"vae": json.loads(meta[_VAE_META])}).vae, source
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path.name}: its {_VAE_META} metadata is unreadable: {e}") from None
    return _vae_config({VAE + k: s for k, s in source.shapes.items()}), source


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A VAE file or folder (vae_tensors' layouts) as plainsd's AutoencoderKL, loaded strictly with shape checks.
    Its .name is the file's name (A1111's "VAE" infotext entry), its .hash A1111's short hash of the file and its
    .path the file."""
    path = Path(path)
    cfg, source = vae_tensors(path)
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    state = _strict_state(vae, source, f"{path.name} does not fit the VAE it looks like", dtype)
    vae.load_state_dict(state, strict=True, assign=True)
    vae.name, vae.path = path.name, path
    vae.hash = short_hash(_component_file(path) if path.is_dir() else path)
    return vae.eval().requires_grad_(False)


def save_vae(vae: AutoencoderKL, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a VAE as one .safetensors file in the original layout without a prefix (as the VAE files people share,
    which A1111's models/VAE folder holds), whole or not at all. dtype: e.g. torch.float16; default: the VAE's."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"plainsd saves .safetensors files only; got {path.name!r}")
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v) for k, v in vae.state_dict().items()}
    return write_safetensors(state, path, {"format": "pt", _VAE_META: json.dumps(dataclasses.asdict(vae.config))})


# --- ControlNet files -------------------------------------------------------------------------------

CONTROL = "control_model."  # the prefix of a ControlNet's tensors inside lllyasviel's 1.0 / 1.1 files
CONTROL_LORA = "lora_controlnet"  # the tensor that marks Stability's Control-LoRA files
_CONTROL_META = "plainsd.controlnet"  # what save_controlnet records of a ControlNet beside its tensors

# diffusers ControlNetModel settings that name something plainsd's ControlNet does not have: (setting, the value
# SD 1.x / 2.x and SDXL ControlNets have; a config.json without the setting has that value too). SDXL's
# addition_embed_type, text_time, is read as the UNet's (_check_text_time).
_CONTROLNET_SAME = (("class_embed_type", None), ("num_class_embeds", None), ("encoder_hid_dim", None),
                    ("encoder_hid_dim_type", None), ("mid_block_type", "UNetMidBlock2DCrossAttn"),
                    ("resnet_time_scale_shift", "default"), ("flip_sin_to_cos", True), ("freq_shift", 0),
                    ("mid_block_scale_factor", 1), ("act_fn", "silu"), ("downsample_padding", 1),
                    ("conditioning_embedding_out_channels", [16, 32, 96, 256]))


def controlnet_diffusers_names(cfg: UNetConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs for a ControlNet of this config: the UNet's way down and middle,
    then the hint encoder, the zero convolutions and the middle block's (as diffusers' ControlNetModel names them)."""
    pairs = [p for p in unet_diffusers_names(cfg)
             if p[1].startswith(("time_embed.", "label_emb.", "input_blocks.", "middle_block."))]
    hint = ["conv_in", *(f"blocks.{i}" for i in range(len(HINT_CHANNELS) - 1)), "conv_out"]
    pairs += [(f"controlnet_cond_embedding.{name}.", f"input_hint_block.{2 * i}.") for i, name in enumerate(hint)]
    skips = len(cfg.channel_mult) * (cfg.num_res_blocks + 1)  # the first convolution's, then each block's
    pairs += [(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.") for i in range(skips)]
    pairs.append(("controlnet_mid_block.", "middle_block_out.0."))
    return pairs


def _renamed(source: TensorSource, names: dict[str, str], fix: dict[str, Callable] | None = None) -> TensorSource:
    """The source's tensors under new names ({new name: source key}), some passed through a function."""
    fix = fix or {}
    return TensorSource({n: source.shapes[k] for n, k in names.items()},
                        lambda n: fix.get(n, lambda t: t)(source.get(names[n])), source.metadata)


def _controlnet_names(keys: set[str]) -> dict[str, str]:
    """{original ControlNet name: key in the file} for a single file in any layout: the tensors under
    control_model. (1.0 files, which also carry a whole SD model, left unread), unprefixed, or diffusers' names."""
    if any(k.startswith(CONTROL) for k in keys):
        return {k[len(CONTROL):]: k for k in keys if k.startswith(CONTROL)}
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        # the table needs only the levels, ResBlocks per level and SDXL's vector or not, which the names show
        levels = {k.split(".")[1] for k in keys if k.startswith("down_blocks.")}
        per_level = {k.split(".")[3] for k in keys if k.startswith("down_blocks.0.resnets.")}
        sdxl = "add_embedding.linear_1.weight" in keys
        pairs = controlnet_diffusers_names(UNetConfig(channel_mult=(1,) * len(levels), num_res_blocks=len(per_level),
                                                      adm_in_channels=int(sdxl)))
        return {(_rename(k, pairs) or "?" + k): k for k in keys}
    return {k: k for k in keys}


def _check_controlnet_kind(names: set[str], keys: set[str], label: str) -> None:
    """One sentence for a file that is not a ControlNet plainsd runs, saying what it looks like."""
    if CONTROL_LORA in names:
        raise CheckpointError(f"{label} is a Control-LoRA (low-rank differences from the UNet it steers): it is "
                              "built on a model's UNet, by load_control_lora or a ControlNet unit")
    if "input_hint_block.0.weight" in names and "time_embed.0.weight" in names:
        if "difference" in names:
            raise CheckpointError(f"{label} is a ControlNet stored as its difference from a base UNet (a "
                                  "transfer-control file), which plainsd does not load; it runs SD 1.x / 2.x and "
                                  "SDXL ControlNets with their full weights and Control-LoRAs")
        return
    raise CheckpointError(f"{label} is not a ControlNet: it has no {CONTROL}*, input_hint_block.* or "
                          f"controlnet_cond_embedding.* tensors; it looks like {_looks_like(keys)}")


def _looks_like(keys: set[str]) -> str:
    """What a file that is not what the caller wanted looks like, for its error message."""
    if any(k.startswith(UNET) for k in keys):
        return "a Stable Diffusion checkpoint (load it with plainsd.load)"
    if any("lora_" in k or ".lora." in k for k in keys):
        return "a LoRA file"
    if any(k.startswith((CONTROL, "input_hint_block.", "controlnet_cond_embedding.")) for k in keys):
        return "a ControlNet (load it with load_controlnet)"
    if any(k.startswith(("adapter.", "body.")) for k in keys):
        return "a T2I-Adapter (load it with load_adapter)"
    return f"something else (its first keys are {_few(keys)})"


def _controlnet_file(path: Path, source: TensorSource | None = None) -> tuple[UNetConfig, int, bool, TensorSource]:
    """A single ControlNet file: (config, hint channels, global pooling, tensors under the original names).
    source: the file's tensors when the caller has opened it already."""
    source = source or read_tensors(path)
    names = _controlnet_names(set(source.shapes))
    _check_controlnet_kind(set(names), set(source.shapes), path.name)
    source = _renamed(source, names)
    if _CONTROL_META in source.metadata:  # plainsd's own files say what the shapes cannot (the tiny configs' heads)
        try:
            meta = json.loads(source.metadata[_CONTROL_META])
            cfg = ModelConfig.from_dict({"unet": meta["unet"]}).unet
            return cfg, int(meta["hint_channels"]), bool(meta.get("global_pool")), source
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path.name}: its {_CONTROL_META} metadata is unreadable: {e}") from None
    needed = ("input_blocks.0.0.weight", "middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    if "middle_block.1.proj_in.weight" in source.shapes and needed[1] not in source.shapes:
        raise CheckpointError(f"{path.name}: its middle block has no transformer blocks, so its tensors do not give "
                              "the text width; plainsd reads such a ControlNet from a diffusers folder (config.json)")
    if any(k not in source.shapes for k in needed):
        lacks = _few(set(needed) - set(source.shapes))
        raise CheckpointError(f"{path.name} is not a whole SD 1.x / 2.x or SDXL ControlNet: it lacks {lacks}")
    # The heads are not in the file: 8 for SD1 (768-wide text), 64 channels each for SD2 and SDXL, as the UNets have.
    # "shuffle" in the name means global pooling: the A1111 extension's rule (the files cannot say).
    return (_unet_config(source.shapes, prefix=""), source.shapes["input_hint_block.0.weight"][1],
            "shuffle" in path.stem.lower(), source)


def _controlnet_folder(root: Path) -> tuple[UNetConfig, int, bool, TensorSource]:
    """A diffusers ControlNetModel folder (config.json and its weights): as _controlnet_file."""
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{root} is not a diffusers ControlNet folder: config.json is missing")
    c = _read_json(root / "config.json")
    if c.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise CheckpointError(f"{root} holds a diffusers {c['_class_name']}, not a ControlNetModel")
    cross_only = c.get("only_cross_attention", False)  # (one for all levels, or one per level)
    settings = [(field, c.get(field, value), value) for field, value in _CONTROLNET_SAME]
    settings.append(("only_cross_attention", any(cross_only) if isinstance(cross_only, list) else cross_only, False))
    for field, have, value in settings:
        if (list(have) if isinstance(have, (list, tuple)) else have) != value:
            raise CheckpointError(f"{root}: its ControlNet has {field}={have!r}, which plainsd's ControlNet does not "
                                  f"run (it needs {field}={value!r})")
    _check_text_time(c, f"{root}: its ControlNet")
    order = c.get("controlnet_conditioning_channel_order", "rgb")
    if order not in ("rgb", "bgr"):
        raise CheckpointError(f"{root}: unknown controlnet_conditioning_channel_order {order!r} (rgb or bgr)")
    cfg = _diffusers_unet_config(c)
    source = read_tensors(_component_file(root))
    pairs = controlnet_diffusers_names(cfg)
    names = {(_rename(k, pairs) or "?" + k): k for k in source.shapes}
    # diffusers turns a bgr model's hint around before its first convolution; the same, once, in the weight
    fix = {"input_hint_block.0.weight": lambda t: t.flip(1)} if order == "bgr" else {}
    return cfg, c.get("conditioning_channels", 3), bool(c.get("global_pool_conditions")), _renamed(source, names, fix)


def load_controlnet(path: str | os.PathLike, dtype: torch.dtype | None = None) -> ControlNet:
    """Load a ControlNet: lllyasviel's 1.0 / 1.1 files (.pth read with weights_only, .safetensors; with or without
    the control_model. prefix), a single file in diffusers' names, or a diffusers ControlNetModel folder. The
    config is read from the file (SD 1.x, 2.x or SDXL, hint channels); the load is strict, with shape checks.

    dtype: the weights' dtype (default float32; runtime.prepare_controlnet casts to the engine's).
    The ControlNet's .name is the file's stem (the folder's name); .global_pool is set for "shuffle" models.
    """
    path = Path(path)
    if path.is_dir():
        return _build_controlnet(path, *_controlnet_folder(path), dtype)
    if path.exists():
        return _build_controlnet(path, *_controlnet_file(path), dtype)
    raise CheckpointError(f"no such ControlNet file or folder: {path}")


def load_control_lora(path: str | os.PathLike, unet: torch.nn.Module, dtype: torch.dtype | None = None,
                      source: TensorSource | None = None) -> ControlNet:
    """Stability's Control-LoRA (control-lora-canny-rank128, ...): a ControlNet kept as low-rank differences from
    the UNet it steers, built here on that UNet's weights as ComfyUI and the A1111 extension build it. Its tensors
    carry the ControlNet's own names: each X.up / X.down pair adds up @ down (both flattened after their first
    axis, the product reshaped) to the UNet's X.weight; every other tensor is the ControlNet's own value; what
    the file leaves out of the way down and the middle is the UNet's. The result is a plain ControlNet of the
    UNet's config (a strict load).

    unet: the model's UNet as it is now (with the LoRAs a run merged in, as ComfyUI's patched model); dtype: as
    load_controlnet's; source: the file's tensors when the caller has opened them."""
    path = Path(path)
    source = source or read_tensors(path)
    keys = set(source.shapes)
    if CONTROL_LORA not in keys or "input_hint_block.0.weight" not in keys:
        raise CheckpointError(f"{path.name} is not a Control-LoRA: it has no {CONTROL_LORA} and input_hint_block.* "
                              f"tensors; it looks like {_looks_like(keys)}")
    with torch.device("meta"):
        controlnet = ControlNet(unet.config, source.shapes["input_hint_block.0.weight"][1])
    low_rank = {k[:-len(".up")] for k in keys if k.endswith(".up") and k[:-len(".up")] + ".down" in keys}
    shapes = {name: tuple(t.shape) for name, t in controlnet.state_dict().items()}
    names = {n: s for n, s in shapes.items() if n in keys or _holds(unet, n)}  # (the rest: missing)
    used = set(names) | {CONTROL_LORA} | {f"{layer}.{end}" for layer in low_rank if layer + ".weight" in shapes
                                          for end in ("up", "down")}
    names.update({"?" + k: source.shapes[k] for k in keys - used})  # (unexpected: _strict_state names them)

    def get(name: str) -> torch.Tensor:
        layer, _, attr = name.rpartition(".")
        # (a copy of the UNet's: LoRAs change its weights in place, and offloading frees them)
        value = source.get(name) if name in keys else getattr(unet.get_submodule(layer), attr).detach().clone()
        if layer not in low_rank or attr != "weight":
            return value
        up, down = source.get(layer + ".up").float(), source.get(layer + ".down").float()
        if up.shape[1] != down.shape[0] or up.shape[0] * down[0].numel() != value.numel():
            raise CheckpointError(f"{path.name}: the low-rank pair {layer}.up {list(up.shape)} / .down "
                                  f"{list(down.shape)} does not fit the UNet's {layer}.weight {list(value.shape)}")
        return value.float() + (up.flatten(1) @ down.flatten(1)).reshape(value.shape)

    state = _strict_state(controlnet, TensorSource(names, get, source.metadata),
                          f"{path.name} does not fit this model's UNet as a Control-LoRA", dtype or torch.float32)
    controlnet.load_state_dict(state, strict=True, assign=True)
    controlnet.name, controlnet.control_lora = path.stem, True
    return controlnet.eval().requires_grad_(False)


def _holds(module: torch.nn.Module, name: str) -> bool:
    """Whether the module has this parameter or buffer, or a packed layer's weight (a property that builds it:
    runtime/packing.py, not called here)."""
    layer, _, attr = name.rpartition(".")
    try:
        sub = module.get_submodule(layer)
    except AttributeError:
        return False
    return (sub._parameters.get(attr) is not None or sub._buffers.get(attr) is not None
            or isinstance(getattr(type(sub), attr, None), property))


def _build_controlnet(path: Path, cfg: UNetConfig, hint_channels: int, pool: bool, source: TensorSource,
                      dtype: torch.dtype | None) -> ControlNet:
    """The ControlNet of this config with the source's weights (a strict load)."""
    with torch.device("meta"):
        controlnet = ControlNet(cfg, hint_channels)
    kind = "SDXL" if cfg.adm_in_channels > 0 else "SD2" if cfg.head_dim > 0 else "SD1"
    state = _strict_state(controlnet, source, f"{path.name} does not fit the {kind} ControlNet it looks like",
                          dtype or torch.float32)
    controlnet.load_state_dict(state, strict=True, assign=True)
    controlnet.global_pool = pool
    controlnet.name = path.stem if path.is_file() else path.name
    return controlnet.eval().requires_grad_(False)


def _strict_state(module: torch.nn.Module, source: TensorSource, problem: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's whole state dict read from the source (names must match exactly, shapes too), in dtype;
    a missing, unexpected or misshaped tensor raises one CheckpointError that starts with `problem`."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(source.shapes))
    unexpected = sorted(k.lstrip("?") for k in set(source.shapes) - set(expected))
    problems = [f"{len(missing)} tensors missing ({_few(missing)})"] if missing else []
    problems += [f"{len(unexpected)} unexpected tensors ({_few(unexpected)})"] if unexpected else []
    if problems:
        raise CheckpointError(f"{problem}: " + "; ".join(problems))
    state, misshaped = {}, []
    for name, want in expected.items():
        tensor = source.get(name)
        if tuple(tensor.shape) != want:
            if tensor.numel() == torch.Size(want).numel() and len(want) in (2, 4) and tensor.ndim in (2, 4):
                tensor = tensor.reshape(want)  # attention projections stored as Linear instead of 1x1 Conv, or back
            else:
                misshaped.append(f"{name}: file {list(tensor.shape)}, model {list(want)}")
                continue
        if not tensor.is_floating_point():
            raise CheckpointError(f"{problem}: tensor {name} is {tensor.dtype}, expected floating point weights")
        state[name] = tensor.to(dtype).contiguous()
    if misshaped:
        raise CheckpointError(f"{problem}: {len(misshaped)} tensors have the wrong shape ({'; '.join(misshaped[:4])})")
    return state


def save_controlnet(controlnet: ControlNet, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write a ControlNet as one .safetensors file in the original layout without a prefix (as the ControlNet 1.1
    .safetensors files people share; A1111's extension, ComfyUI and diffusers read it), whole or not at all.

    dtype: e.g. torch.float16 to halve the file; default: the ControlNet's own dtype.
    metadata: more header entries to keep beside plainsd's own (a training's recipe).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"plainsd saves .safetensors files only; got {path.name!r}")
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in controlnet.state_dict().items()}
    meta = {"unet": dataclasses.asdict(controlnet.config), "hint_channels": controlnet.hint_channels,
            "global_pool": bool(controlnet.global_pool)}
    return write_safetensors(state, path, {**(metadata or {}), "format": "pt", _CONTROL_META: json.dumps(meta)})


# --- T2I-Adapter files ------------------------------------------------------------------------------

_ADAPTER_META = "plainsd.adapter"  # what save_adapter records of an adapter beside its tensors
ADAPTER_LEVELS = 4  # what a bare adapter file's blocks are split into: SD's four levels, SDXL's three and its middle
_ADAPTER_KINDS = {"full_adapter": UNSHUFFLE, "full_adapter_xl": XL_UNSHUFFLE}  # diffusers' adapter_type: its fold


def adapter_diffusers_names(cfg: AdapterConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, TencentARC prefix) pairs for a T2I-Adapter of this config (the A1111 extension's
    correspondence): diffusers keeps each level's blocks apart, TencentARC numbers them straight through."""
    n, pairs = cfg.num_res_blocks, [("adapter.conv_in.", "conv_in.")]
    for level in range(len(cfg.channels)):
        pairs.append((f"adapter.body.{level}.in_conv.", f"body.{level * n}.in_conv."))
        pairs += [(f"adapter.body.{level}.resnets.{j}.", f"body.{level * n + j}.") for j in range(n)]
    return pairs


def _adapter_names(keys: set[str]) -> dict[str, str]:
    """{TencentARC name: key in the file}: diffusers' names renamed, an "adapter." prefix dropped."""
    if any(k.startswith("adapter.body.") and ".resnets." in k for k in keys):
        levels = {k.split(".")[2] for k in keys if k.startswith("adapter.body.")}
        per_level = {k.split(".")[4] for k in keys if k.startswith("adapter.body.0.resnets.")}
        pairs = adapter_diffusers_names(AdapterConfig(channels=(1,) * len(levels), num_res_blocks=len(per_level)))
        return {(_rename(k, pairs) or "?" + k): k for k in keys}
    return {(k[len("adapter."):] if k.startswith("adapter.") else k): k for k in keys}


def _adapter_config(shapes: dict[str, tuple], label: str) -> AdapterConfig:
    """The config of a TencentARC-named adapter from its shapes: four levels; SDXL's if its conv_in reads a hint
    folded by 16 (as the A1111 extension tells them apart)."""
    if "style_embedding" in shapes or "body.0.body.0.block1.weight" in shapes:
        raise CheckpointError(f"{label} is a style or light T2I-Adapter, which plainsd does not run; it runs the "
                              "full adapters (canny, sketch, depth, keypose, openpose, ...)")
    if "conv_in.weight" not in shapes or "body.0.block1.weight" not in shapes:
        raise CheckpointError(f"{label} is not a T2I-Adapter: it has no conv_in / body.0.block1 tensors; "
                              f"it looks like {_looks_like(set(shapes))}")
    reads = shapes["conv_in.weight"][1]
    fold = next((f for f in (UNSHUFFLE, XL_UNSHUFFLE) if reads % f ** 2 == 0 and reads // f ** 2 in (1, 3)), None)
    if fold is None:
        raise CheckpointError(f"{label}: its conv_in reads {reads} channels, which is not a T2I-Adapter's "
                              f"{UNSHUFFLE ** 2} (SD 1.x / 2.x) or {XL_UNSHUFFLE ** 2} (SDXL) per hint channel "
                              "(1 or 3)")
    blocks = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("body."))
    if blocks % ADAPTER_LEVELS:
        raise CheckpointError(f"{label}: {blocks} ResnetBlocks do not split into a T2I-Adapter's "
                              f"{ADAPTER_LEVELS} levels")
    n = blocks // ADAPTER_LEVELS
    return AdapterConfig(channels=tuple(shapes[f"body.{i * n}.block1.weight"][0] for i in range(ADAPTER_LEVELS)),
                         num_res_blocks=n, hint_channels=reads // fold ** 2, ksize=shapes["body.0.block2.weight"][-1],
                         use_conv=any(k.endswith("down_opt.op.weight") for k in shapes), xl=fold == XL_UNSHUFFLE)


def _adapter_folder(root: Path) -> tuple[AdapterConfig, TensorSource]:
    """A diffusers T2IAdapter folder (config.json and its weights), under TencentARC's names."""
    c = _read_json(root / "config.json") if (root / "config.json").is_file() else {}
    if c.get("_class_name") != "T2IAdapter":
        raise CheckpointError(f"{root} is not a diffusers T2IAdapter folder (its config.json is missing or names another class)")
    kind = c.get("adapter_type", "full_adapter")
    if kind not in _ADAPTER_KINDS or c.get("downscale_factor", UNSHUFFLE) != _ADAPTER_KINDS[kind]:
        raise CheckpointError(f"{root} is a {kind} T2I-Adapter (downscale factor {c.get('downscale_factor')}); "
                              "plainsd runs the full_adapter (factor 8, SD 1.x / 2.x) and full_adapter_xl (factor "
                              "16, SDXL)")
    cfg = AdapterConfig(channels=tuple(c.get("channels", (320, 640, 1280, 1280))), num_res_blocks=c.get("num_res_blocks", 2),
                        hint_channels=c.get("in_channels", 3), xl=kind == "full_adapter_xl")
    source = read_tensors(_component_file(root))
    pairs = adapter_diffusers_names(cfg)
    return cfg, _renamed(source, {(_rename(k, pairs) or "?" + k): k for k in source.shapes})


def load_adapter(path: str | os.PathLike, dtype: torch.dtype | None = None) -> T2IAdapter:
    """Load a T2I-Adapter: TencentARC's files (.pth read with weights_only, .safetensors), a single file in diffusers'
    names, or a diffusers T2IAdapter folder; config from the file, strict load with shape checks.

    dtype: the weights' dtype (default float32). The adapter's .name is the file's stem (the folder's name).
    """
    path = Path(path)
    if path.is_dir():
        return _build_adapter(path, *_adapter_folder(path), dtype)
    if path.exists():
        return _build_adapter(path, *_adapter_file(path, read_tensors(path)), dtype)
    raise CheckpointError(f"no such T2I-Adapter file or folder: {path}")


def _adapter_file(path: Path, source: TensorSource) -> tuple[AdapterConfig, TensorSource]:
    """A single T2I-Adapter file (its tensors opened): its config and tensors under TencentARC's names."""
    source = _renamed(source, _adapter_names(set(source.shapes)))
    if _ADAPTER_META not in source.metadata:
        return _adapter_config(source.shapes, path.name), source
    try:  # plainsd's own files (any number of levels)
        meta = json.loads(source.metadata[_ADAPTER_META])
        return AdapterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}), source
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path.name}: its {_ADAPTER_META} metadata is unreadable: {e}") from None


def _build_adapter(path: Path, cfg: AdapterConfig, source: TensorSource, dtype: torch.dtype | None) -> T2IAdapter:
    """The T2I-Adapter of this config with the source's weights (a strict load)."""
    with torch.device("meta"):
        adapter = T2IAdapter(cfg)
    state = _strict_state(adapter, source, f"{path.name} does not fit the T2I-Adapter it looks like", dtype or torch.float32)
    adapter.load_state_dict(state, strict=True, assign=True)
    adapter.name = path.stem if path.is_file() else path.name
    return adapter.eval().requires_grad_(False)


def save_adapter(adapter: T2IAdapter, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write a T2I-Adapter as one .safetensors file in TencentARC's names (as the A1111 extension reads them),
    whole or not at all. dtype: e.g. torch.float16; default: the adapter's own."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"plainsd saves .safetensors files only; got {path.name!r}")
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in adapter.state_dict().items()}
    return write_safetensors(state, path, {"format": "pt", _ADAPTER_META: json.dumps(dataclasses.asdict(adapter.config))})


# --- either kind, as a ControlNet unit names it ---------------------------------------------------------

def _is_adapter_file(keys: set[str]) -> bool:
    """Whether a file's tensors are a T2I-Adapter's (TencentARC's or diffusers' names; style and light ones
    included, so that they get the adapter loader's sentence): no ControlNet has body.* or adapter.* tensors."""
    return any(k.startswith(("body.", "adapter.")) or k == "style_embedding" for k in keys)


def load_control_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
                       unet: torch.nn.Module | None = None) -> ControlNet | T2IAdapter:
    """What a ControlNet unit's model file holds, as the A1111 extension tells them apart by their keys: a
    ControlNet (load_controlnet's layouts), a Control-LoRA (load_control_lora, built on `unet`) or a T2I-Adapter
    (load_adapter's); a diffusers folder by its config's class. The file is opened once."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if config.is_file() and _read_json(config).get("_class_name") == "T2IAdapter":
            return _build_adapter(path, *_adapter_folder(path), dtype)
        return _build_controlnet(path, *_controlnet_folder(path), dtype)
    if not path.exists():
        raise CheckpointError(f"no such ControlNet or T2I-Adapter file or folder: {path}")
    source = read_tensors(path)
    keys = set(source.shapes)
    if _is_adapter_file(keys):
        return _build_adapter(path, *_adapter_file(path, source), dtype)
    if CONTROL_LORA in keys and unet is not None:
        return load_control_lora(path, unet, dtype, source)
    if not any(k.startswith((CONTROL, "input_hint_block.", "controlnet_cond_embedding.")) for k in keys):
        raise CheckpointError(f"{path.name} is neither a ControlNet nor a T2I-Adapter: it looks like {_looks_like(keys)}")
    return _build_controlnet(path, *_controlnet_file(path, source), dtype)


# --- writing diffusers folders ------------------------------------------------------------------------

# The releases whose save_pretrained output save_diffusers writes (config keys, file names); a reader takes
# any config written by an older release.
DIFFUSERS_VERSION, TRANSFORMERS_VERSION = "0.39.0", "4.57.6"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _inverted(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A (diffusers prefix, original prefix) table turned around; where two diffusers names map to one original
    (the VAE's attention: current and older names), the first, current one."""
    out: dict[str, str] = {}
    for theirs, ours in pairs:
        out.setdefault(ours, theirs)
    return list(out.items())


def _diffusers_state(state: dict[str, torch.Tensor], pairs: list[tuple[str, str]], what: str) -> dict[str, torch.Tensor]:
    """A network's state dict (original names) under diffusers' names, with the loading table turned around."""
    table, out = _inverted(pairs), {}
    for key, tensor in state.items():
        name = _rename(key, table)
        if name is None:
            raise CheckpointError(f"the {what}'s tensor {key} has no name in diffusers' layout")
        out[name] = tensor
    return out


def diffusers_unet_state(unet: torch.nn.Module, cfg: UNetConfig) -> dict[str, torch.Tensor]:
    return _diffusers_state(unet.state_dict(), unet_diffusers_names(cfg), "UNet")


def diffusers_vae_state(vae: torch.nn.Module, cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """The VAE's tensors in diffusers' names; its attention projections are Linear there (1x1 convolutions here)."""
    state = _diffusers_state(vae.state_dict(), vae_diffusers_names(cfg), "VAE")
    projection = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
    return {k: (t[:, :, 0, 0] if projection.search(k) and t.ndim == 4 else t) for k, t in state.items()}


def diffusers_unet_config(config: ModelConfig) -> dict:
    """The config.json of diffusers' UNet2DConditionModel for this model, every key save_pretrained writes."""
    u = config.unet
    n = len(u.channel_mult)
    channels = [u.model_channels * m for m in u.channel_mult]
    attention = [i in u.attention_levels for i in range(n)]
    depth = u.transformer_depth
    if isinstance(depth, tuple):  # (the last level's is also the middle block's; 1 where unused, as Stability's)
        depth = [u.depth_at(i) if attention[i] or i == n - 1 else 1 for i in range(n)]
    sdxl = u.adm_in_channels > 0
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "addition_embed_type": "text_time" if sdxl else None, "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": SIZE_EMBED_DIM if sdxl else None,
        # diffusers' attention_head_dim is the number of heads (a misnomer it keeps for old configs' sake)
        "attention_head_dim": u.num_heads if u.num_heads > 0 else [u.heads_for(c) for c in channels],
        "attention_type": "default", "block_out_channels": channels, "center_input_sample": False,
        "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": u.context_dim, "cross_attention_norm": None,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "downsample_padding": 1, "dropout": 0.0, "dual_cross_attention": False, "encoder_hid_dim": None,
        "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": u.in_channels,
        "layers_per_block": u.num_res_blocks, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": u.norm_groups,
        "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
        "out_channels": u.out_channels, "projection_class_embeddings_input_dim": u.adm_in_channels if sdxl else None,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
        "reverse_transformer_layers_per_block": None, "sample_size": config.resolution // config.vae.factor,
        "time_cond_proj_dim": u.time_cond_proj_dim or None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": depth,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        # SD 2.x in half precision overflows in attention unless diffusers computes it in float32 (its 2.1 repos')
        "upcast_attention": family(config) == "SD2", "use_linear_projection": u.use_linear_proj,
    }


def diffusers_vae_config(config: ModelConfig) -> dict:
    """The config.json of diffusers' AutoencoderKL for this model's VAE, every key save_pretrained writes."""
    v = config.vae
    n = len(v.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "block_out_channels": [v.ch * m for m in v.ch_mult], "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True, "in_channels": v.in_channels, "latent_channels": v.z_channels, "latents_mean": None,
        "latents_std": None, "layers_per_block": v.num_res_blocks, "mid_block_add_attention": True,
        "norm_num_groups": v.norm_groups, "out_channels": v.in_channels, "sample_size": config.resolution,
        "scaling_factor": config.scale_factor, "shift_factor": None, "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": True, "use_quant_conv": True,
    }


def hf_text_config(cfg: TextConfig, layers: int, architecture: str, dtype: torch.dtype) -> dict:
    """The config.json of transformers' CLIPTextModel (or CLIPTextModelWithProjection) for a text tower of
    `layers` layers, every key save_pretrained writes (torch_dtype under the name older releases read too)."""
    return {
        "architectures": [architecture], "attention_dropout": 0.0, "bos_token_id": 49406, "eos_token_id": 49407,
        "hidden_act": cfg.act, "hidden_size": cfg.width, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": int(cfg.width * cfg.mlp_ratio), "layer_norm_eps": 1e-05,
        "max_position_embeddings": cfg.context_length, "model_type": "clip_text_model",
        "num_attention_heads": cfg.heads, "num_hidden_layers": layers, "pad_token_id": 49407 if cfg.pad == "eot" else 0,
        "projection_dim": cfg.projection_dim or cfg.width, "torch_dtype": _DTYPE_NAMES[dtype],
        "transformers_version": TRANSFORMERS_VERSION, "vocab_size": cfg.vocab_size,
    }


def _hf_text_tower(tower: torch.nn.Module, cfg: TextConfig, sdxl: bool) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors, layers) of a text tower as a diffusers folder holds it. SD 1.x / 2.x folders keep only the layers
    the pipeline reads (diffusers' CLIPTextModel gives its last layer with the final norm: SD 2.x's penultimate
    layer drops the 24th, as diffusers' own converter does) and no projection; SDXL's towers are kept whole
    (its pipeline picks the penultimate layer and pools the last)."""
    state = tower.state_dict()
    if sdxl:
        return state, cfg.layers
    layers = cfg.layers - (cfg.clip_skip - 1)
    keep = {k: v for k, v in state.items() if k != "text_projection.weight"}
    dropped = tuple(f"text_model.encoder.layers.{i}." for i in range(layers, cfg.layers))
    return {k: v for k, v in keep.items() if not k.startswith(dropped)}, layers


def write_clip_tokenizer(folder: Path, tokenizer, pad: str) -> None:
    """transformers' CLIPTokenizer files (vocab.json, merges.txt and the special tokens) from plainsd's own
    tokenizer, which holds the same BPE vocabulary and merges: pad "eot" pads with <|endoftext|>, "zero" with
    "!" (id 0, as OpenCLIP's tokenizer pads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>" if pad == "eot" else "!", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    settings = {**special, "add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
                "errors": "replace", "model_max_length": tokenizer.context_length, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


def diffusers_scheduler_config(config: ModelConfig) -> dict:
    """The scheduler diffusers' own repositories ship: PNDM for SD 1.x / 2.x, Euler for SDXL (plainsd's samplers
    need only the training schedule and the prediction type, which both say)."""
    common = {"_diffusers_version": DIFFUSERS_VERSION, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "num_train_timesteps": 1000,
              "prediction_type": DIFFUSERS_PREDICTIONS[config.prediction], "steps_offset": 1,
              "timestep_spacing": "leading", "trained_betas": None}
    if not config.sdxl:
        return {"_class_name": "PNDMScheduler", **common, "set_alpha_to_one": False, "skip_prk_steps": True}
    return {"_class_name": "EulerDiscreteScheduler", **common, "final_sigmas_type": "zero",
            "interpolation_type": "linear", "rescale_betas_zero_snr": False, "sigma_max": None, "sigma_min": None,
            "timestep_type": "discrete", "use_beta_sigmas": False, "use_exponential_sigmas": False,
            "use_karras_sigmas": False}


def _diffusers_text_layout(config: ModelConfig) -> list[tuple[str, str, str, TextConfig]]:
    """(text encoder folder, tokenizer folder, transformers class, tower config) per text tower, in the order of
    the model's towers: SD 1.x / 2.x's one, SDXL's CLIP-L and bigG, the refiner's bigG (as text_encoder_2)."""
    if not config.sdxl:
        return [("text_encoder", "tokenizer", "CLIPTextModel", config.text)]
    big_g = ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection")
    if config.text2 is None:
        return [(*big_g, config.text)]
    return [("text_encoder", "tokenizer", "CLIPTextModel", config.text), (*big_g, config.text2)]


def diffusers_model_index(config: ModelConfig) -> dict:
    """model_index.json: the pipeline class (inpainting, SDXL, the refiner's img2img) and its components."""
    inpaint = config.unet.in_channels == 9
    scheduler = diffusers_scheduler_config(config)["_class_name"]
    index = {"_diffusers_version": DIFFUSERS_VERSION, "feature_extractor": [None, None],
             "image_encoder": [None, None], "scheduler": ["diffusers", scheduler],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for encoder, tokenizer, cls, _ in _diffusers_text_layout(config):
        index[encoder], index[tokenizer] = ["transformers", cls], ["transformers", "CLIPTokenizer"]
    if not config.sdxl:
        name = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
        return {"_class_name": name, **index, "requires_safety_checker": False, "safety_checker": [None, None]}
    if config.sdxl == "refiner":
        return {"_class_name": "StableDiffusionXLImg2ImgPipeline", **index, "force_zeros_for_empty_prompt": False,
                "requires_aesthetics_score": True, "text_encoder": [None, None], "tokenizer": [None, None]}
    name = "StableDiffusionXLInpaintPipeline" if inpaint else "StableDiffusionXLPipeline"
    return {"_class_name": name, **index, "force_zeros_for_empty_prompt": True}


def save_diffusers(sd: StableDiffusion, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write the model as a diffusers folder (model_index.json, scheduler/, unet/, vae/, text_encoder/ and
    tokenizer/, SDXL's text_encoder_2/ and tokenizer_2/), as diffusers' save_pretrained lays it out: its
    from_pretrained and plainsd.load read it. Written into a temporary sibling folder, then renamed: an interrupted
    save leaves nothing; an existing folder is refused.

    dtype: e.g. torch.float16 to halve the files; default: the model's own dtype.
    metadata: header entries to keep (another file's), written into the UNet's file, where plainsd.load reads them.
    """
    folder = Path(folder)
    if folder.exists():
        raise ValueError(f"{folder} exists already; save_diffusers writes a new folder")
    dtype = dtype or sd.dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"diffusers folders hold float32, float16 or bfloat16 weights, not {dtype}")
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # (a save interrupted before)
    try:
        _write_diffusers(sd, tmp, dtype, metadata or {})
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def _write_diffusers(sd: StableDiffusion, root: Path, dtype: torch.dtype, metadata: dict[str, str]) -> None:
    config = sd.config

    def component(part: str, settings: dict, state: dict[str, torch.Tensor], name: str, meta: dict | None = None):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        write_safetensors(tensors, root / part / name, {**(meta or {}), "format": "pt"})

    kept = {k: v for k, v in metadata.items() if k not in ("format", "plainsd.config", "plainsd.prediction")}
    if sd.defaults:
        kept["plainsd.defaults"] = json.dumps(sd.defaults)
    component("unet", diffusers_unet_config(config), diffusers_unet_state(sd.unet, config.unet), "diffusion_pytorch_model.safetensors", kept)
    component("vae", diffusers_vae_config(config), diffusers_vae_state(sd.vae, config.vae),
              "diffusion_pytorch_model.safetensors")
    for (encoder, tokenizer, cls, cfg), tower in zip(_diffusers_text_layout(config), sd.text_towers):
        state, layers = _hf_text_tower(tower, cfg, bool(config.sdxl))
        component(encoder, hf_text_config(cfg, layers, cls, dtype), state, "model.safetensors")
        write_clip_tokenizer(root / tokenizer, sd.tokenizer, cfg.pad)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(diffusers_scheduler_config(config), indent=2) + "\n")
    (root / "model_index.json").write_text(json.dumps(diffusers_model_index(config), indent=2) + "\n")
