"""LoRA (Hu et al. 2021): read the file layouts people publish, apply at generation time, merge, train.

Every layout is turned into one form at read time: kohya / A1111's. There, per adapted layer,
`lora_unet_<name>.lora_down.weight` [rank, in(, k, k)], `.lora_up.weight` [out, rank(, 1, 1)] and `.alpha`;
the layer's weight becomes W + weight * (alpha / rank) * up @ down. kohya names a UNet layer by its
diffusers module path with dots turned into underscores (lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q);
text encoder layers are lora_te_text_model_encoder_layers_0_self_attn_q_proj. plainsd's modules carry the
original (LDM) names, so a table built from the same prefix pairs as the diffusers loader translates;
LDM-style names (lora_unet_input_blocks_1_1_proj_in) are accepted too. SDXL's kohya files name the UNet's layers
in the LDM style (kohya trains SDXL on the original UNet: lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q)
and the two text towers lora_te1_ (CLIP-L) and lora_te2_ (bigG), both in transformers' names; lora_te_ is the
first tower, as diffusers reads it.

The other layouts name the same layers by their diffusers / transformers module paths:
- diffusers' current (PEFT) one: `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<path>...` (and
  SDXL's `text_encoder_2.<path>...`),
  with LoraConfig fields (r, lora_alpha, rank_pattern, alpha_pattern) in the `lora_adapter_metadata` header;
- diffusers' older ones: `unet.<path>.lora.down.weight` / `.lora.up.weight`, the attention-processor
  `...attn1.processor.to_q_lora.down.weight`, and `text_encoder.<path>.lora_linear_layer.down.weight`;
- PEFT's own `adapter_model.safetensors`: `base_model.model.<path>.lora_A.weight` beside an
  `adapter_config.json` holding the same LoraConfig fields.
Their scale is lora_alpha / r as PEFT computes it (lora_alpha / sqrt(r) with use_rslora); with no
config and no `.alpha` tensors it is 1 (alpha = rank), as diffusers does for a file of one rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .lycoris import IA3Layer, LoHaLayer, LoKrLayer, decompose
from .models import family
from .runtime import set_weight
from .weights import CheckpointError, _read_json, _rename, read_tensors, unet_diffusers_names

UNET_PREFIX, TEXT_PREFIX = "lora_unet_", "lora_te_"
TEXT1_PREFIX, TEXT2_PREFIX = "lora_te1_", "lora_te2_"  # SDXL's towers: CLIP-L, OpenCLIP bigG
SHIPPED = (Path(__file__).parent / "data" / "plainsd-base.lcm-lora.safetensors",)  # available without a folder
# What kohya adapts by default: every Linear / 1x1 conv inside the UNet's transformer blocks, and the text
# encoder's attention and MLP projections.
UNET_TRAIN_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_TRAIN_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class LoRALayer:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    mid: torch.Tensor | None = None         # LoCon's CP decomposition of a convolution (lora_mid) [rank, rank, k, k]
    dora_scale: torch.Tensor | None = None  # DoRA's magnitudes (dora_scale, PEFT's lora_magnitude_vector)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """up @ down * alpha / rank, shaped like the layer's weight (float32)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        scale = (self.alpha / self.rank) if self.alpha is not None else 1.0
        if self.mid is not None:
            d = torch.einsum("n m k l, i n, m j -> i j k l", self.mid.float(), up, down) * scale
        else:
            d = (up @ down) * scale
        if d.numel() != torch.Size(shape).numel():
            raise ValueError(f"up {list(self.up.shape)} x down {list(self.down.shape)} does not fit a weight of {list(shape)}")
        return d.reshape(shape)

    def change(self, weight: torch.Tensor) -> torch.Tensor:
        """The change to the layer's weight at strength 1 (float32)."""
        return decompose(self.delta(weight.shape), weight, self.dora_scale)


@dataclass
class LoRA:
    name: str
    layers: dict[str, LoRALayer | LoHaLayer | LoKrLayer | IA3Layer]   # kohya name without the .lora_down/... suffix
    metadata: dict
    hash: str = ""      # A1111's short hash of the file (file_hash), which infotexts write as "Lora hashes"


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
    for prefixes, path, tower in text_towers(sd):
        for prefix in prefixes:
            table.update({k: ("text_encoder", path + v) for k, v in _module_names(tower, prefix).items()})
    return table


def text_towers(sd) -> list[tuple[tuple[str, ...], str, nn.Module]]:
    """(kohya prefixes, module path in sd.text_encoder, tower) per text tower, the prefix files are written with
    first: SD 1.x / 2.x's one tower is lora_te_; SDXL's CLIP-L lora_te1_ (and lora_te_, as diffusers reads it),
    its bigG lora_te2_, also the refiner's bigG (diffusers' text_encoder_2 in both pipelines)."""
    if not sd.config.sdxl:
        return [((TEXT_PREFIX,), "", sd.text_encoder)]
    out = []
    for i, (holder, tower) in enumerate(zip(sd.text_encoder.embedders, sd.text_encoder.towers)):
        openclip = hasattr(holder, "model")
        prefixes = (TEXT2_PREFIX,) if openclip else (TEXT1_PREFIX, TEXT_PREFIX)
        out.append((prefixes, f"embedders.{i}.{'model' if openclip else 'transformer'}.", tower))
    return out


# How diffusers and PEFT end the keys of a layer's two matrices and its alpha: (suffix, part).
_PEFT_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                  (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                  (".lora_linear_layer.up.weight", "up"), ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
                  (".lora_magnitude_vector.weight", "dora"), (".lora_magnitude_vector", "dora"), (".alpha", "alpha"))
_PEFT_PREFIXES = (("unet.", "unet"), ("text_encoder.", "text_encoder"), ("text_encoder_2.", "text_encoder_2"),
                  ("base_model.model.", None))
# diffusers' attention-processor layout names a projection after the processor's attribute (to_q_lora, to_out_lora).
_TEXT_PROCESSOR_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_PROCESSOR_NAMES = {"unet": {"to_out": "to_out.0"}, "text_encoder": _TEXT_PROCESSOR_NAMES,
                    "text_encoder_2": _TEXT_PROCESSOR_NAMES}
_KOHYA_PREFIX = {"unet": UNET_PREFIX, "text_encoder": TEXT_PREFIX, "text_encoder_2": TEXT2_PREFIX}
# The file names diffusers (save_lora_weights) and PEFT (save_pretrained) always use: such a file is named
# after its folder, so a downloaded lcm-lora-sdv1-5/pytorch_lora_weights.safetensors is <lora:lcm-lora-sdv1-5:1>.
GENERIC_STEMS = ("pytorch_lora_weights", "adapter_model")
LAYOUTS = ("kohya / A1111 / LyCORIS (lora_unet_..., lora_te_... / SDXL's lora_te1_..., lora_te2_...: LoRA, LoCon, LoHa, "
           "LoKr, (IA)^3, DoRA), diffusers (unet.<path>.lora_A.weight, .lora.down.weight, .processor.to_q_lora.down.weight, "
           "text_encoder_2.<path>...) and PEFT (base_model.model.<path>.lora_A.weight)")


def lora_name(path: str | os.PathLike) -> str:
    """The name a prompt calls a LoRA file by: its stem, or its folder's for diffusers' / PEFT's generic names."""
    path = Path(path)
    return path.parent.name if path.stem in GENERIC_STEMS and path.parent.name else path.stem


def read_lora(path: str | os.PathLike) -> LoRA:
    """A LoRA file in any of the layouts above (.safetensors, or .pt/.ckpt through weights_only loading)."""
    path = Path(path)
    source = read_tensors(path)
    _refuse_unread(path, list(source.shapes))
    if all(k.startswith((UNET_PREFIX, TEXT_PREFIX, TEXT1_PREFIX, TEXT2_PREFIX)) for k in source.shapes):
        layers = {base: _kohya_layer(path, base, found, source) for base, found in _kohya_parts(path, source).items()}
    else:
        layers = {base: LoRALayer(source.get(down), source.get(up), alpha,
                                  dora_scale=source.get(dora).flatten() if dora else None)  # (PEFT's: per row)
                  for base, (down, up, alpha, dora) in _peft_layers(path, source).items()}
    if not layers:
        raise CheckpointError(f"{path.name} holds no LoRA layers (expected lora_unet_... / lora_te_... or "
                              "unet.<path>.lora_A.weight keys)")
    return LoRA(lora_name(path), layers, source.metadata, file_hash(path, source.metadata))


def file_hash(path: Path, metadata: dict) -> str:
    """A1111's short hash of a LoRA file (its Lora extension's shorthash): the first 12 hex digits of the
    sshs_model_hash its trainer recorded, else of the SHA-256 of a .safetensors file's tensor data (kohya's and
    the Additional Networks extension's hash, which leaves the header out) or of a whole .pt / .ckpt file."""
    recorded = metadata.get("sshs_model_hash", "")
    if recorded:
        return recorded[:12]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def infotext_hashes(requested: list[tuple[str, float]], loras: list[tuple[LoRA, float]]) -> str | None:
    """The infotext's "Lora hashes" value for a prompt's tags and the LoRAs they resolved to, as A1111 writes it:
    "name: hash, name: hash", each name as the tag gives it without ':' or ','."""
    pairs = {name.translate(str.maketrans("", "", ":,")): lora.hash for (name, _), (lora, _) in zip(requested, loras)}
    return ", ".join(f"{name}: {h}" for name, h in pairs.items() if h) or None


def _refuse_unread(path: Path, keys: list[str]):
    """One sentence for the LoRA-like files plainsd knowingly does not read."""
    if any(k.endswith((".lokr_t1", ".oft_blocks", ".oft_diag", ".b_norm", ".w_norm")) for k in keys):
        raise CheckpointError(f"{path.name} is a LyCORIS OFT / BOFT / norm file or a LoKr with lokr_t1, which plainsd "
                              "does not read; it reads LoRA, LoCon, LoHa, LoKr, (IA)^3 and DoRA")


# The parts of a layer in kohya / LyCORIS files, by key suffix: LoRA / LoCon, LoHa, LoKr, (IA)^3 and DoRA's.
_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "hada_w1_a",
                "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "weight", "on_input")


def _kohya_parts(path: Path, source) -> dict[str, dict[str, str]]:
    """kohya name -> {part: key} for a kohya / A1111 / LyCORIS file."""
    parts: dict[str, dict[str, str]] = {}
    others = []
    for key in source.shapes:
        base, _, kind = key.partition(".")
        if kind in _KOHYA_PARTS:
            parts.setdefault(base, {})[kind] = key
        else:
            others.append(key)
    if others:
        kinds = sorted({k.partition(".")[2] for k in others})[:4]
        raise CheckpointError(f"{path.name} is not a LoRA plainsd reads: it has keys like {others[0]!r} "
                              f"({', '.join(kinds)}); it reads {LAYOUTS}")
    return parts


def _kohya_layer(path: Path, base: str, found: dict[str, str], source):
    """One layer of a kohya / LyCORIS file, of the kind its parts show (A1111's order of trying them)."""
    get = {part: source.get(key) for part, key in found.items()}
    alpha = float(get["alpha"]) if "alpha" in get else None
    if all(f"hada_{w}" in get for w in ("w1_a", "w1_b", "w2_a", "w2_b")):
        return LoHaLayer(get["hada_w1_a"], get["hada_w1_b"], get["hada_w2_a"], get["hada_w2_b"], alpha,
                         get.get("hada_t1"), get.get("hada_t2"), get.get("dora_scale"))
    has = [f"lokr_w{i}" in get or (f"lokr_w{i}_a" in get and f"lokr_w{i}_b" in get) for i in (1, 2)]
    if all(has):
        return LoKrLayer(get.get("lokr_w1"), get.get("lokr_w1_a"), get.get("lokr_w1_b"), get.get("lokr_w2"),
                         get.get("lokr_w2_a"), get.get("lokr_w2_b"), alpha, get.get("lokr_t2"), get.get("dora_scale"))
    for kind, prefix in (("LoHa", "hada_"), ("LoKr", "lokr_")):
        if any(part.startswith(prefix) for part in get):
            raise CheckpointError(f"{path.name}: {kind} layer {base} lacks some of its {prefix}* tensors (it has "
                                  f"{', '.join(sorted(get))})")
    if "weight" in get:
        return IA3Layer(get["weight"], bool(get["on_input"].item()) if "on_input" in get else False)
    down, up, _ = _pair(path, base, {k.split(".")[0].removeprefix("lora_"): key for k, key in found.items()}, alpha)
    return LoRALayer(source.get(down), source.get(up), alpha, get.get("lora_mid.weight"), get.get("dora_scale"))


def _pair(path: Path, base: str, found: dict[str, str], alpha: float | None) -> tuple[str, str, float | None]:
    if "down" not in found or "up" not in found:
        raise CheckpointError(f"{path.name}: layer {base} lacks its lora_down or lora_up weight")
    return found["down"], found["up"], alpha


def _parse_peft_key(key: str) -> tuple[str, str, str] | None:
    """A diffusers / PEFT key -> (network, module path in diffusers / transformers names, part), or None."""
    for suffix, part in _PEFT_SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    net = None
    for prefix, name in _PEFT_PREFIXES:
        if stem.startswith(prefix):
            stem, net = stem[len(prefix):], name
            break
    stem = stem.replace(".processor.", ".")
    net = net or ("text_encoder" if stem.startswith("text_model.") else "unet")
    if suffix.startswith("_lora."):
        head, _, last = stem.rpartition(".")
        stem = f"{head}.{_PROCESSOR_NAMES[net].get(last, last)}"
    return net, stem, part


def _peft_layers(path: Path, source) -> dict[str, tuple[str, str, float | None, str | None]]:
    """kohya name -> (down key, up key, alpha, DoRA magnitude key) for a diffusers or PEFT file; alpha / rank is
    PEFT's scale."""
    parts: dict[str, dict[str, str]] = {}
    modules: dict[str, tuple[str, str]] = {}
    for key in source.shapes:
        parsed = _parse_peft_key(key)
        if parsed is None:
            raise CheckpointError(f"{path.name} is not a LoRA plainsd reads: it has keys like {key!r}; it reads {LAYOUTS}")
        net, module, part = parsed
        base = _KOHYA_PREFIX[net] + module.replace(".", "_")
        parts.setdefault(base, {})[part] = key
        modules[base] = (net, module)
    configs = _peft_configs(path, source)
    out = {}
    for base, found in parts.items():
        down, up, alpha = _pair(path, base, found, float(source.get(found["alpha"])) if "alpha" in found else None)
        net, module = modules[base]
        if net in configs:
            alpha = _peft_alpha(configs[net], module, source.shapes[down][0])
        if configs.get(net, {}).get("use_dora") and "dora" not in found:
            raise CheckpointError(f"{path.name}: its config says use_dora, but layer {module} has no "
                                  "lora_magnitude_vector")
        out[base] = (down, up, alpha, found.get("dora"))
    return out


def _peft_configs(path: Path, source) -> dict[str, dict]:
    """network -> LoraConfig fields, from diffusers' lora_adapter_metadata header or PEFT's adapter_config.json."""
    if "lora_adapter_metadata" in source.metadata:
        try:
            meta = json.loads(source.metadata["lora_adapter_metadata"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path.name}: its lora_adapter_metadata header is not JSON: {e}") from None
        configs: dict[str, dict] = {}
        for key, value in meta.items():
            net, dot, field = key.partition(".")
            if dot and net in _KOHYA_PREFIX:
                configs.setdefault(net, {})[field] = value
            else:  # a model's own save_lora_adapter: one config, no network prefix
                configs.setdefault("", {})[key] = value
        shared = configs.pop("", None)
        configs = configs or (dict.fromkeys(_KOHYA_PREFIX, shared) if shared else {})
    elif any(k.startswith("base_model.model.") for k in source.shapes) and (path.parent / "adapter_config.json").is_file():
        configs = dict.fromkeys(_KOHYA_PREFIX, _read_json(path.parent / "adapter_config.json"))
    else:
        return {}
    for config in configs.values():
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{path.name} is a PEFT {config.get('peft_type')} adapter, which plainsd does not "
                                  "read; it reads PEFT's LoRA (DoRA included)")
    return configs


def _peft_alpha(config: dict, module: str, rank: int) -> float:
    """The alpha that makes alpha / rank equal PEFT's scaling for this module (rank_pattern, alpha_pattern, rsLoRA)."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    lora_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    scale = lora_alpha / math.sqrt(r) if config.get("use_rslora") else lora_alpha / r
    return scale * rank


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern that matches the module path, or a suffix of it at a dot, wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def deltas(sd, lora: LoRA, weight: float = 1.0) -> dict[tuple[str, str], torch.Tensor]:
    """(network, parameter name) -> weight change, for every layer of the LoRA; errors if one does not fit."""
    table = name_table(sd)
    unknown = [k for k in lora.layers if k not in table]
    if unknown:
        raise CheckpointError(f"LoRA {lora.name} does not fit this {family(sd.config)} model: {len(unknown)} of its "
                              f"layers have no match here (e.g. {unknown[0]})")
    out = {}
    for key, layer in lora.layers.items():
        net, module_name = table[key]
        module = getattr(sd, net).get_submodule(module_name)
        try:
            d = layer.change(_weight(module))
        except ValueError as e:
            raise CheckpointError(f"LoRA {lora.name}, layer {key}: {e}") from None
        out[(net, module_name + ".weight")] = d * weight
    return out


def fitting(sd, lora: LoRA, shared=lambda module: False) -> tuple[LoRA, int]:
    """The part of a LoRA made for another model that fits this one, as a LoRA of its own, and how many of its
    layers do not fit: a layer fits where this model has a layer of that name (name_table) whose weight takes the
    change (what A1111's Lora extension patches when its refiner takes over). A layer on a module for which
    shared(module) is true fits but is left out: the model shares that module with one the LoRA is applied to."""
    table = name_table(sd)
    layers, unfit = {}, 0
    for key, layer in lora.layers.items():
        module = getattr(sd, table[key][0]).get_submodule(table[key][1]) if key in table else None
        try:
            if module is None:
                raise ValueError(key)
            layer.change(_weight(module))
        except ValueError:  # no such layer, or a weight of another shape
            unfit += 1
            continue
        if not shared(module):
            layers[key] = layer
    return LoRA(lora.name, layers, lora.metadata, lora.hash), unfit


_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its LoRAs, changed layers' originals)


def use(sd, loras: list[tuple[LoRA, float]]):
    """Give the model exactly these LoRAs: its own weights plus each LoRA's change at its weight. They stay on until
    another set is asked for, as A1111's Lora extension keeps them from one picture to the next, so a run with the
    LoRAs of the run before costs nothing; use(sd, []) gives the model's own weights back, and so does a set with a
    LoRA that does not fit (the error is raised). Each changed layer's original is kept while a LoRA is on, and
    every new set starts from the originals, so the weights never drift. A set is the same when it holds the same
    LoRA objects (resolve hands out one per unchanged file) at the same weights."""
    if wears(sd, loras):
        return
    # The originals back first: DoRA's and (IA)^3's changes depend on the weights they change.
    for key, original in _APPLIED.get(sd, ((), {}))[1].items():
        set_weight(_layer(sd, key), original)
    _APPLIED.pop(sd, None)
    wanted = _wanted(loras)
    changes: dict[tuple[str, str], torch.Tensor] = {}
    for lora, w in wanted:  # (all computed before any is added: a LoRA that does not fit leaves the model's own)
        for k, d in deltas(sd, lora, w).items():
            changes[k] = changes[k] + d if k in changes else d
    if not wanted:
        return
    saved = {k: _layer(sd, k).weight.detach().clone() for k in changes}  # (a copy already when packed)
    _APPLIED[sd] = ((object(),), saved)  # (a set that matches none, until every change is in)
    _add(sd, changes)
    _APPLIED[sd] = (wanted, saved)


def wears(sd, loras: list[tuple[LoRA, float]]) -> bool:
    """Whether the model has exactly this set on (use): the same LoRA objects at the same weights."""
    on, wanted = _APPLIED.get(sd, ((), {}))[0], _wanted(loras)
    return len(on) == len(wanted) and all(a is b and wa == wb for (a, wa), (b, wb) in zip(on, wanted))


def worn(sd) -> tuple:
    """The set the model has on (use): ((LoRA, weight), ...), () for none."""
    return _APPLIED.get(sd, ((), {}))[0]


def _wanted(loras: list[tuple[LoRA, float]]) -> tuple:
    return tuple((lora, w) for lora, w in loras if w != 0)  # (weight 0 is the base model, exactly)


def carries(sd) -> bool:
    """Whether the model has LoRAs on (use)."""
    return sd in _APPLIED


def merge(sd, lora: LoRA, weight: float = 1.0):
    """Add the LoRA into the model's weights for good (what `plainsd lora merge` saves)."""
    _add(sd, deltas(sd, lora, weight))
    return sd


def _weight(module: nn.Module) -> torch.Tensor:
    """A layer's weight as a plain tensor (runtime may hold it packed: set_weight's counterpart reads it back)."""
    return module.weight.detach()


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
    """name -> file: the LoRAs shipped beside the shipped model (plainsd-base.lcm-lora), then the LoRA files in a
    folder (names are file stems, subfolders included; a diffusers / PEFT file with a generic name in a subfolder
    is named after the subfolder)."""
    found = {p.name.removesuffix(".safetensors"): p for p in SHIPPED if p.is_file()}
    if folder is None:
        return found
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"LoRA folder {folder} does not exist")
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".pt", ".ckpt") and not p.name.startswith("."):
            found.setdefault(p.stem if p.parent == folder else lora_name(p), p)
    return found


_FITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {shipped LoRA name: fits}


def fits_shipped(sd, name: str) -> bool:
    """Whether a LoRA shipped beside the shipped model (find_loras(None)) has this name and fits this model in every
    layer (fitting): what a model's recommendation of it needs (a model trained or merged from the shipped one keeps
    its recommendations, but may not take the LoRA). Answered once per model: its layers' shapes do not change."""
    known = _FITS.setdefault(sd, {})
    if name not in known:
        path = find_loras(None).get(name)
        known[name] = path is not None and fitting(sd, read_lora(path))[1] == 0
    return known[name]


def file_metadata(path: str | os.PathLike) -> dict:
    """A LoRA file's header metadata as A1111's /sdapi/v1/loras lists it (values that are JSON objects decoded);
    {} for .pt/.ckpt files and unreadable headers: one odd file must not break a listing."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        metadata = read_tensors(path).metadata
    except CheckpointError:
        return {}
    out: dict = {}
    for key, value in metadata.items():
        out[key] = value
        if value.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                out[key] = json.loads(value)
    return out


_READ: dict[tuple, LoRA] = {}  # (file, mtime, size) -> its LoRA, for the files of the last resolve


def resolve(requested: list[tuple[str, float]], folder) -> list[tuple[LoRA, float]]:
    """<lora:name:weight> tags -> loaded LoRAs, by name from the shipped ones and the folder only. A file unchanged
    since the last call gives the same LoRA object (so that use() sees the same set) without being read again."""
    if not requested:
        return []
    available = find_loras(folder)
    out, read = [], {}
    for name, w in requested:
        if name not in available:
            where = folder if folder is not None else "the shipped LoRAs (no LoRA folder was given: --lora-dir)"
            raise ValueError(f"no LoRA named {name!r} in {where}; available: {', '.join(available) or 'none'}")
        stat = available[name].stat()
        key = (available[name].resolve(), stat.st_mtime_ns, stat.st_size)
        read[key] = read.get(key) or _READ.get(key) or read_lora(available[name])
        out.append((read[key], w))
    _READ.clear()
    _READ.update(read)
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
    nets = [("unet", sd.unet, UNET_PREFIX, UNET_TRAIN_TARGETS)]
    if text_encoder:  # (each tower under the prefix kohya writes for it)
        nets += [("text_encoder", tower, prefixes[0], TEXT_TRAIN_TARGETS) for prefixes, _, tower in text_towers(sd)]
    for net, network, prefix, names in nets:
        for name, module in network.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if not (net == "unet" and targets == "all") and not _kohya_target(net, name, names):
                continue
            # kohya names SD 1.x / 2.x UNet layers the diffusers way, SDXL's the original way (as its trainers do)
            original = net == "text_encoder" or sd.config.sdxl
            kohya = name if original else (_rename(name + ".", to_diffusers) or name + ".")[:-1]
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
