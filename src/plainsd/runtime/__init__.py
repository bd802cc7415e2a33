"""Where and how the networks run on a CPU: precision, memory, packed weights, attention, the compiled path.

    sd = plainsd.load("model.safetensors", dtype=choose_dtype("auto"))   # bf16 where the CPU has it
    engine = prepare(sd, backend="openvino")                              # optional compiled UNet
    prepare_controlnet(controlnet, like=engine)                           # a ControlNet the same way
    pipeline.txt2img(engine, "a red circle")                              # what the pipeline is given

One concern a file:
    precision.py   the networks' dtype: bf16 where the CPU multiplies it natively, float32 elsewhere
    storage.py     fp16 weights computed in float32 (SDXL on CPUs without native bf16)
    memory.py      glibc's malloc asked to keep freed memory between UNet steps, and to hand it back
    offloading.py  a network's weights in a file while another runs (one UNet at a time)
    packing.py     weights reordered once into oneDNN's layout; how a layer's class is swapped for a faster one
    winograd.py    float32 3x3 convolutions as Winograd's F(4x4, 3x3): a quarter of the multiplications
    attention.py   bf16 attention through oneDNN on CPUs without AMX (the same class swap)
    openvino.py    the UNet converted and compiled by OpenVINO, kept on disk
The networks in models/ stay plain PyTorch; prepare() is what turns these on for a loaded model.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from ..models.t2i_adapter import T2IAdapter
from .attention import use_plain_attention, use_runtime_attention
from .memory import keep_freed_memory, release_freed_memory
from .offloading import offload, offloaded, restore
from .openvino import OpenVINOUNet, cache_limit, code_version, default_cache_dir, fingerprint, prune_cache
from .packing import (PackedConv2d, PackedGEGLU, PackedLinear, pack_weights, packing_available, set_weight,
                      unpack_weights)
from .precision import PRECISIONS, choose_dtype, cpu_flags, cpu_name, native_bf16
from .storage import HalfStoredConv2d, HalfStoredLinear, compute_in_float32, half_stored

BACKENDS = ("eager", "openvino")


class Engine:
    """A model ready to generate on this machine, and what runs its networks: what the pipeline is given.

    engine.sd is the model; engine.unet is what a sampler calls as unet(x, t, context): the model's own UNet
    (backend "eager", its weights packed by prepare) or the UNet compiled by OpenVINO. engine.tiny_decoder is
    fast mode's TAESD decoder once one is given (use_tiny_decoder) or loaded from beside the checkpoint (the
    pipeline does that on first use and keeps it here).
    """

    def __init__(self, sd, backend: str = "eager", unet=None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.sd, self.backend = sd, backend
        self.unet = unet if unet is not None else sd.unet
        self.tiny_decoder = None
        self.controlnets = OrderedDict()  # loaded ControlNets, the most recently used last (control.load_controlnets)
        self.refiner = None  # (path, Engine): the refiner checkpoint last used (pipeline._refiner_engine)
        # A1111's sd_vae setting for a checkpoint this engine hands over to (a refiner): its path -> the VAE file to
        # decode with, None for its own (pipeline._refiner_vae); None here: every refiner decodes with its own
        self.vae_for = None
        # A1111's sd_checkpoints_limit: with 1 (its default), the refiner's UNet and the base's take turns in
        # memory (pipeline._resident, runtime/offloading.py); with 2, both stay
        self.checkpoints_limit = 1
        self.prepared = False  # made by prepare(): another model it loads (a refiner) is prepared alike
        self.load_dtype = sd.unet.dtype  # the dtype the model's weights came in (fp16 for fp16 storage)

    def use_tiny_decoder(self, decoder, name: str = "the tiny decoder") -> None:
        """Decode fast mode's pictures with this TAESD decoder (checked against the model's latents)."""
        if decoder.latent_channels != self.sd.config.vae.z_channels:
            raise ValueError(f"{name} decodes {decoder.latent_channels}-channel latents; this model's "
                             f"have {self.sd.config.vae.z_channels}")
        self.tiny_decoder = decoder.to(self.sd.vae.dtype)

    def use_vae(self, vae=None) -> None:
        """Encode and decode with this VAE (weights.load_vae), readied as prepare() readies the model's own; None
        (or the model's own): the model's own VAE again (A1111's "None", and "Automatic" with no VAE named after the
        model)."""
        base = getattr(self, "base_vae", None) or self.sd.vae
        self.base_vae = base
        if vae is None or vae is base:
            self.sd.vae = base
            return
        if (vae.config.z_channels, vae.config.factor) != (base.config.z_channels, base.config.factor):
            raise ValueError(f"the VAE {getattr(vae, 'name', '')} makes {vae.config.z_channels}-channel latents "
                             f"{vae.config.factor}x smaller; this model's are {base.config.z_channels}-channel, "
                             f"{base.config.factor}x smaller")
        if getattr(vae, "prepared", False) is not True:
            vae.to(dtype=base.dtype, memory_format=torch.channels_last)
            use_runtime_attention(vae)
            pack_weights(vae, runs_once=True)
            vae.prepared = True
        self.sd.vae = vae

    def __repr__(self) -> str:
        return f"Engine({self.sd!r}, backend={self.backend!r})"


def prepare(sd, backend: str = "eager", cache_dir: str | os.PathLike | None = None,
            precision: str | None = None) -> Engine:
    """Get a loaded model ready to generate: channels-last convolutions, the chosen backend, the attention this
    CPU runs best (use_runtime_attention), and on the eager path the weights of the UNet and the VAE packed for
    oneDNN (pack_weights). The eager bf16 path also turns on torch.set_flush_denormal for the process (denormal
    floats become zero), and every path asks the C library to keep freed memory for reuse (keep_freed_memory).
    A model loaded in fp16 keeps its layers' weights in fp16 and computes in float32 (compute_in_float32: how
    SDXL runs on CPUs without native bf16). Returns the Engine the pipeline runs.

    precision: cast the networks (None keeps the dtype the model was loaded in).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if precision is not None:
        sd.to(choose_dtype(precision, sd.config))
    load_dtype = sd.unet.dtype
    if load_dtype == torch.float16:
        for network in (sd.text_encoder, sd.unet, sd.vae):
            compute_in_float32(network)
    # oneDNN's convolutions run fastest on NHWC; plain float32 too, so this holds for every precision.
    sd.unet.to(memory_format=torch.channels_last)
    sd.vae.to(memory_format=torch.channels_last)
    unet = OpenVINOUNet(sd.unet, cache_dir) if backend == "openvino" else None
    # every backend: the VAE runs eagerly under OpenVINO too, and a traced UNet keeps SDPA (runtime/attention.py)
    use_runtime_attention(sd.unet)
    use_runtime_attention(sd.vae)
    if backend == "eager":
        pack_weights(sd.unet)  # (what the dtype and this torch allow: pack_weights)
        pack_weights(sd.vae, runs_once=True)
    if backend == "eager" and sd.unet.dtype == torch.bfloat16:
        # bf16 inference: numbers below float32's 1.2e-38 carry nothing here, and the fused attention's
        # exponentials that underflow into that range run slower as denormals (runtime/attention._attention_fused)
        torch.set_flush_denormal(True)
    keep_freed_memory()
    engine = Engine(sd, backend, unet)
    engine.prepared, engine.load_dtype = True, load_dtype
    return engine


def prepare_controlnet(controlnet, like: Engine):
    """Get a loaded ControlNet (models/controlnet.py) ready to run beside an engine's UNet, as prepare() readies
    the UNet's way down, which the ControlNet copies: the UNet's dtype (or, where the UNet keeps fp16 weights
    computed in float32, the same: compute_in_float32), channels-last convolutions, the attention this CPU runs
    best and packed weights. Packed on every backend: under OpenVINO too, the ControlNet runs eagerly. Changes the
    ControlNet in place (preparing it again is harmless) and returns it. A T2I-Adapter (models/t2i_adapter.py) is
    readied the same way."""
    dtype = like.sd.unet.dtype
    if half_stored(like.sd.unet):
        if not half_stored(controlnet):
            compute_in_float32(controlnet.half())
        controlnet.to(memory_format=torch.channels_last)
    else:
        controlnet.to(dtype=dtype, memory_format=torch.channels_last)
    use_runtime_attention(controlnet)
    pack_weights(controlnet, runs_once=isinstance(controlnet, T2IAdapter))  # (an adapter runs once a pass)
    if dtype == torch.bfloat16:
        torch.set_flush_denormal(True)  # as prepare() does for a bf16 UNet
    return controlnet


__all__ = [
    "BACKENDS", "Engine", "prepare", "prepare_controlnet",
    "PRECISIONS", "choose_dtype", "cpu_flags", "cpu_name", "native_bf16",
    "HalfStoredConv2d", "HalfStoredLinear", "compute_in_float32", "half_stored",
    "keep_freed_memory", "release_freed_memory", "offload", "offloaded", "restore",
    "PackedConv2d", "PackedGEGLU", "PackedLinear", "pack_weights", "packing_available", "set_weight", "unpack_weights",
    "use_plain_attention", "use_runtime_attention",
    "OpenVINOUNet", "cache_limit", "code_version", "default_cache_dir", "fingerprint", "prune_cache",
]
