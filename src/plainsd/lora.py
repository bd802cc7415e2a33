"""LoRA (Hu et al. 2021) in the kohya / A1111 file format: read, apply at generation time, merge, train.

A LoRA file holds, per adapted layer, `lora_unet_<name>.lora_down.weight` [rank, in(, k, k)],
`.lora_up.weight` [out, rank(, 1, 1)] and `.alpha`; the layer's weight becomes
W + weight * (alpha / rank) * up @ down. kohya names a UNet layer by its diffusers module path with dots
turned into underscores (lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q); text
encoder layers are lora_te_text_model_encoder_layers_0_self_attn_q_proj. plainsd's modules carry the
original (LDM) names, so a table built from the same prefix pairs as the diffusers loader translates;
LDM-style names (lora_unet_input_blocks_1_1_proj_in) are accepted too.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .runtime import set_weight
from .weights import CheckpointError, _rename, read_tensors, unet_diffusers_names

UNET_PREFIX, TEXT_PREFIX = "lora_unet_", "lora_te_"
# What kohya adapts by default: every Linear / 1x1 conv inside the UNet's transformer blocks, and the text
# encoder's attention and MLP projections.
UNET_TRAIN_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_TRAIN_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class LoRALayer:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """up @ down * alpha / rank, shaped like the layer's weight (float32)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        scale = (self.alpha / self.rank) if self.alpha is not None else 1.0
        d = (up @ down) * scale
        if d.numel() != torch.Size(shape).numel():
            raise ValueError(f"up {list(self.up.shape)} x down {list(self.down.shape)} does not fit a weight of {list(shape)}")
        return d.reshape(shape)


@dataclass
class LoRA:
    name: str
    layers: dict[str, LoRALayer]   # kohya name without the .lora_down/... suffix
    metadata: dict


def _module_names(model: nn.Module, prefix: str, to_diffusers=None) -> dict[str, str]:
    """kohya name -> our module path, for every Linear / Conv2d of a network (both name styles)."""
    table = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        table[prefix + name.replace(".", "_")] = name
        if to_diffusers is not None:
            other = _rename(name + ".", to_diffusers)
            if other is not None:
                table[prefix + other[:-1].replace(".", "_")] = name
    return table


def name_table(sd) -> dict[str, tuple[str, str]]:
    """kohya name -> ("unet" | "text_encoder", module path) for this model."""
    to_diffusers = [(o, d) for d, o in unet_diffusers_names(sd.config.unet)]  # original prefix -> diffusers prefix
    table = {k: ("unet", v) for k, v in _module_names(sd.unet, UNET_PREFIX, to_diffusers).items()}
    table.update({k: ("text_encoder", v) for k, v in _module_names(sd.text_encoder, TEXT_PREFIX).items()})
    return table


def read_lora(path: str | os.PathLike) -> LoRA:
    """A kohya / A1111 LoRA file (.safetensors, or .pt/.ckpt through weights_only loading)."""
    path = Path(path)
    source = read_tensors(path)
    layers: dict[str, dict] = {}
    others = []
    for key in source.shapes:
        base, _, kind = key.partition(".")
        if kind in ("lora_down.weight", "lora_up.weight", "alpha"):
            layers.setdefault(base, {})[kind] = source.get(key)
        else:
            others.append(key)
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in layers):
        raise CheckpointError(f"{path.name} is an SDXL LoRA (lora_te1_/lora_te2_ keys); plainsd runs SD 1.x and 2.x")
    if others:
        kinds = sorted({k.partition(".")[2] for k in others})[:4]
        raise CheckpointError(f"{path.name} is not a LoRA in the kohya / A1111 format: it has keys like {others[0]!r} "
                              f"({', '.join(kinds)}); LyCORIS LoHa/LoKr, DoRA and diffusers/PEFT files are not read")
    if not layers:
        raise CheckpointError(f"{path.name} holds no LoRA layers (expected lora_unet_... / lora_te_... keys)")
    out = {}
    for base, parts in layers.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise CheckpointError(f"{path.name}: layer {base} lacks its lora_down or lora_up weight")
        alpha = parts.get("alpha")
        out[base] = LoRALayer(parts["lora_down.weight"], parts["lora_up.weight"],
                              float(alpha) if alpha is not None else None)
    return LoRA(path.stem, out, source.metadata)


def deltas(sd, lora: LoRA, weight: float = 1.0) -> dict[tuple[str, str], torch.Tensor]:
    """(network, parameter name) -> weight change, for every layer of the LoRA; errors if one does not fit."""
    table = name_table(sd)
    unknown = [k for k in lora.layers if k not in table]
    if unknown:
        raise CheckpointError(f"LoRA {lora.name} does not fit this {sd.config.text.layout == 'openclip' and 'SD 2' or 'SD 1'} "
                              f"model: {len(unknown)} of its layers have no match here (e.g. {unknown[0]})")
    out = {}
    for key, layer in lora.layers.items():
        net, module_name = table[key]
        module = getattr(sd, net).get_submodule(module_name)
        try:
            d = layer.delta(module.weight.shape)
        except ValueError as e:
            raise CheckpointError(f"LoRA {lora.name}, layer {key}: {e}") from None
        out[(net, module_name + ".weight")] = d * weight
    return out


@contextlib.contextmanager
def applied(sd, loras: list[tuple[LoRA, float]]):
    """Add the LoRAs to the model's weights for the duration of the block; the originals come back after."""
    changes: dict[tuple[str, str], torch.Tensor] = {}
    for lora, w in loras:
        if w == 0:
            continue  # weight 0 is the base model, exactly
        for k, d in deltas(sd, lora, w).items():
            changes[k] = changes[k] + d if k in changes else d
    saved = {k: _layer(sd, k).weight.detach().clone() for k in changes}  # (a copy already when packed)
    try:
        _add(sd, changes)
        yield sd
    finally:
        for key, original in saved.items():
            set_weight(_layer(sd, key), original)


def merge(sd, lora: LoRA, weight: float = 1.0):
    """Add the LoRA into the model's weights for good (what `plainsd lora merge` saves)."""
    _add(sd, deltas(sd, lora, weight))
    return sd


def _layer(sd, key: tuple[str, str]) -> nn.Module:
    """The layer whose weight a (network, "<module>.weight") key names."""
    net, name = key
    return getattr(sd, net).get_submodule(name.removesuffix(".weight"))


def _add(sd, changes: dict[tuple[str, str], torch.Tensor]):
    """Add each change to its layer's weight (set_weight: the weight may be packed for oneDNN)."""
    with torch.no_grad():
        for key, d in changes.items():
            layer = _layer(sd, key)
            w = layer.weight
            set_weight(layer, (w.float() + d).to(w.dtype))


def find_loras(folder: str | os.PathLike | None) -> dict[str, Path]:
    """name -> file for the LoRA files in a folder (names are file stems; subfolders included)."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"LoRA folder {folder} does not exist")
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".pt", ".ckpt") and not p.name.startswith("."):
            found.setdefault(p.stem, p)
    return found


def resolve(requested: list[tuple[str, float]], folder) -> list[tuple[LoRA, float]]:
    """<lora:name:weight> tags -> loaded LoRAs, by name from the folder only."""
    if not requested:
        return []
    if folder is None:
        raise ValueError("the prompt asks for LoRAs (<lora:...>) but no LoRA folder was given (--lora-dir)")
    available = find_loras(folder)
    out = []
    for name, w in requested:
        if name not in available:
            raise ValueError(f"no LoRA named {name!r} in {folder}; available: {', '.join(available) or 'none'}")
        out.append((read_lora(available[name]), w))
    return out


# --- training: adapters as forward hooks -------------------------------------------------------------

class Adapter(nn.Module):
    """The trainable low-rank path beside one Linear / Conv2d: x -> up(down(x)) * alpha / rank."""

    def __init__(self, module: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        if isinstance(module, nn.Linear):
            self.down = nn.Linear(module.in_features, rank, bias=False)
            self.up = nn.Linear(rank, module.out_features, bias=False)
        else:
            self.down = nn.Conv2d(module.in_channels, rank, module.kernel_size, module.stride, module.padding, bias=False)
            self.up = nn.Conv2d(rank, module.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)  # starts as the base model, exactly
        self.scale = 1.0

    def forward(self, x):
        return self.up(self.down(x.to(self.down.weight.dtype))) * (self.alpha / self.rank * self.scale)


def attach(sd, rank: int = 4, alpha: float | None = None, text_encoder: bool = False,
           targets: str = "attention") -> dict[str, Adapter]:
    """Adapters (kohya name -> Adapter) hooked onto the model; the base stays frozen. targets: "attention", kohya's
    default (the UNet's transformer blocks), or "all" (every Linear and convolution of the UNet, as LCM-LoRA).
    An adapter whose scale is 0 is skipped."""
    if targets not in ("attention", "all"):
        raise ValueError(f"LoRA targets are 'attention' or 'all', not {targets!r}")
    alpha = float(rank if alpha is None else alpha)
    to_diffusers = [(o, d) for d, o in unet_diffusers_names(sd.config.unet)]
    adapters: dict[str, Adapter] = {}
    nets = [("unet", UNET_PREFIX, UNET_TRAIN_TARGETS)] + ([("text_encoder", TEXT_PREFIX, TEXT_TRAIN_TARGETS)] if text_encoder else [])
    for net, prefix, names in nets:
        for name, module in getattr(sd, net).named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if not (net == "unet" and targets == "all") and not _kohya_target(net, name, names):
                continue
            kohya = name if net == "text_encoder" else (_rename(name + ".", to_diffusers) or name + ".")[:-1]
            adapter = Adapter(module, rank, alpha).to(next(module.parameters()).dtype)
            adapter.handle = module.register_forward_hook(
                lambda m, args, out, a=adapter: out + a(args[0]).to(out.dtype) if a.scale else out)
            adapters[prefix + kohya.replace(".", "_")] = adapter
    return adapters


def _kohya_target(net: str, name: str, targets: tuple) -> bool:
    """Whether kohya's default LoRA adapts this layer: the listed projections, in the UNet only inside transformers."""
    if not name.endswith(targets):
        return False
    return net != "unet" or ".transformer_blocks." in name or name.endswith(("proj_in", "proj_out"))


def detach(adapters: dict[str, Adapter]):
    """Remove the hooks that attach() put on the model."""
    for a in adapters.values():
        a.handle.remove()


def adapters_state(adapters: dict[str, Adapter], dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The kohya file's tensors for trained adapters."""
    out = {}
    for key, a in adapters.items():
        out[f"{key}.lora_down.weight"] = a.down.weight.detach().to(dtype).contiguous()
        out[f"{key}.lora_up.weight"] = a.up.weight.detach().to(dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(a.alpha), dtype=dtype)
    return out
