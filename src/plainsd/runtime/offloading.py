"""A network's weights written to a file while another network runs, and read back before it runs again.

A1111 keeps one checkpoint in memory by default (its setting sd_checkpoints_limit, 1): when its refiner takes over,
the base model's weights make way for the refiner's, and the base's come back for the next picture. The pipeline
does the same with the two UNets of a refiner run (pipeline._resident): an SDXL base and refiner then never hold
both UNets' weights at once, and a 1024x1024 picture with the refiner peaks at about what one without it does
(benchmarks/sdxl_memory.md). In the base's steps the base model is whole; in the refiner's, its UNet and the
VAE that decodes their latents alone: the text towers of both models are written out too (the prompts are
encoded before the steps), and so is the base's VAE where the refiner has one of its own.

offload(network) unpacks the network's packed layers (runtime/packing.py), writes every parameter and buffer to one
file in a folder of its own under plainsd's cache (~/.cache/plainsd/offload, or $PLAINSD_CACHE/offload: on disk,
where a system's /tmp may be memory itself), and leaves each of them an empty tensor of its dtype: the modules,
their classes and every reference to them stay, so that nothing else has to know. restore(network) reads the tensors
back in their shapes, dtypes and memory formats, packs the layers that were packed, and deletes the file; the
network then gives the numbers it gave before, bit for bit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .memory import release_freed_memory
from .openvino import default_cache_dir
from .packing import pack_weights, unpack_weights


@dataclass
class _Stored:
    path: Path
    layout: list[tuple[torch.Tensor, tuple, bool]]  # (the emptied tensor, its shape, channels-last) in file order
    packed: bool


_STORED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # network -> _Stored, while offloaded
_FOLDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # network -> its folder, deleted with it


def offloaded(network: nn.Module) -> bool:
    return network in _STORED


def offload(network: nn.Module) -> None:
    """Write the network's weights to its file and free them (module doc); nothing to do when they are
    written out already. Written to a temporary name first: a full disk leaves the network as it was."""
    if network in _STORED:
        return
    packed = unpack_weights(network) > 0
    tensors = _tensors(network)
    if network not in _FOLDERS:
        _FOLDERS[network] = _new_folder()
        weakref.finalize(network, shutil.rmtree, _FOLDERS[network], True)
    folder = _FOLDERS[network]
    path = folder / "weights.bin"
    try:
        with open(path.with_suffix(".tmp"), "wb") as f:
            for t in tensors:
                f.write(_bytes(t.detach().contiguous()))
        os.replace(path.with_suffix(".tmp"), path)
    except OSError as e:
        if packed:
            pack_weights(network)
        path.with_suffix(".tmp").unlink(missing_ok=True)
        raise OSError(f"could not write a network's weights to {folder} to make room for another "
                      f"({e.strerror or e}); free disk space there ($PLAINSD_CACHE) or keep both models in "
                      "memory") from None
    layout = [(t, tuple(t.shape), t.ndim == 4 and not t.is_contiguous() and
               t.is_contiguous(memory_format=torch.channels_last)) for t in tensors]
    for t in tensors:
        t.data = torch.empty(0, dtype=t.dtype)
    _STORED[network] = _Stored(path, layout, packed)
    release_freed_memory()


def restore(network: nn.Module) -> None:
    """Read an offloaded network's weights back (module doc); nothing to do when it is not offloaded."""
    stored = _STORED.pop(network, None)
    if stored is None:
        return
    t = value = None
    with open(stored.path, "rb") as f:
        for t, shape, channels_last in stored.layout:
            value = torch.empty(shape, dtype=t.dtype)
            f.readinto(_bytes(value))
            t.data = value.contiguous(memory_format=torch.channels_last) if channels_last else value
    stored.path.unlink()
    packed = stored.packed
    del stored, t, value  # (the network's own tensors alone now: packing frees each plain weight as it goes)
    if packed:
        pack_weights(network)
    release_freed_memory()


def _new_folder() -> Path:
    """A folder for one network's file, named after this process; folders left by processes that are gone (killed
    while a network was written out) are deleted first."""
    parent = default_cache_dir() / "offload"
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.iterdir():
        pid = old.name.split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def _tensors(network: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of the network, each once."""
    seen, out = set(), []
    for t in [*network.parameters(), *network.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's memory as bytes (for writing it out and reading it back in place)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
