"""The UNet compiled by OpenVINO: converted once per weights, compiled once per input shape, both kept on disk.

prepare(sd, backend="openvino") converts the UNet with openvino.convert_model and keeps the converted model on
disk, keyed by a fingerprint of the weights, the config, the precision and the code that builds the graph
(code_version), and runs it with OpenVINO's CPU plugin; the compiled model of each input shape is exported
beside it, so that a second run maps it from the file and starts in seconds (nothing converted, compiled or
hashed). The UNet's own parameters stay the truth: when they change (a prompt with other LoRAs, say) the
compiled model is looked up again for the new weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch


def default_cache_dir() -> Path:
    base = os.environ.get("PLAINSD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "plainsd")
    return Path(base)


def fingerprint(module: torch.nn.Module, extra: str = "") -> str:
    """A short hash of a module's weights (a strided sample of every tensor, with names, shapes and dtypes)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(extra.encode())
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        stride = max(flat.numel() // 512, 1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::stride].float().numpy().tobytes())
    return h.hexdigest()


def code_version() -> str:
    """A short hash of the source of plainsd's networks (the models package, and runtime/attention.py, whose
    dispatch a prepared model's attention goes through while it is traced) and torch's version: what a
    conversion of a module depends on besides its weights. An OpenVINO conversion made by other code (a graph
    that has changed since) is not reused."""
    h = hashlib.blake2b(torch.__version__.encode(), digest_size=8)
    here = Path(__file__).parent
    for source in sorted(here.parent.joinpath("models").glob("*.py")) + [here / "attention.py"]:
        h.update(source.name.encode() + source.read_bytes())
    return h.hexdigest()


def cache_limit() -> int:
    """Bytes the OpenVINO cache may hold (PLAINSD_OPENVINO_CACHE_GB, default 20: four or five SD1.5-size models)."""
    value = os.environ.get("PLAINSD_OPENVINO_CACHE_GB", "20")
    try:
        gb = float(value)
    except ValueError:
        raise ValueError(f"PLAINSD_OPENVINO_CACHE_GB must be a number of gigabytes, not {value!r}") from None
    return int(gb * 2**30)


def prune_cache(root: Path, limit: int, keep: str) -> list[str]:
    """Delete the least recently used models of the cache until it holds at most `limit` bytes; `keep` (the model
    in use) stays whatever its size. A model's folder is touched each time a run uses it. Returns what went."""
    entries = []
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.is_dir() and not folder.name.endswith(".tmp"):
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            entries.append((folder.stat().st_mtime, folder.name, size))
    total = sum(size for _, _, size in entries)
    removed = []
    for _, name, size in sorted(entries):
        if total <= limit:
            break
        if name != keep:
            shutil.rmtree(root / name, ignore_errors=True)
            total -= size
            removed.append(name)
    return removed


class _WithGuidance(torch.nn.Module):
    """An LCM-distilled UNet with its guidance scale as a fourth positional input, the form the converter traces."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context, guidance=guidance)


class OpenVINOUNet:
    """The UNet through OpenVINO: converted once per weights, compiled once per input shape, both kept on disk.

    cache/<fingerprint>/unet.xml is the converted model (to compile for a new shape); beside it, one exported
    compiled model per input shape, thread count and OpenVINO version, which a later run imports directly (mapped
    from the file) without reading or hashing the converted model again. The cache keeps the most recently used
    models up to PLAINSD_OPENVINO_CACHE_GB (20 by default; each LoRA combination is a model of its own).
    An LCM-distilled UNet (config.time_cond_proj_dim > 0) is converted with its guidance scale as a fourth input,
    which every call must then give."""

    def __init__(self, unet: torch.nn.Module, cache_dir: str | os.PathLike | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise RuntimeError("the openvino backend needs the openvino package: pip install 'plainsd[openvino]'") from None
        self.ov = ov
        self.unet = unet
        self.cache = Path(cache_dir) if cache_dir else default_cache_dir() / "openvino"
        self.core = ov.Core()
        self._versions = None
        self._key: str | None = None
        self._model = None
        self._compiled: dict[tuple, object] = {}

    @property
    def precision(self) -> str:
        return "bf16" if self.unet.dtype == torch.bfloat16 else "f32"

    def _current_versions(self) -> tuple:
        return tuple(p._version for p in self.unet.parameters())  # in-place changes (LoRA) bump these

    def _converted(self, example: tuple[torch.Tensor, ...]):
        """The converted model of the current weights: read from the cache, or converted and saved there."""
        xml = self.cache / self._key / "unet.xml"
        if not xml.is_file():
            # Copy the weights (share_weights=False): with shared memory, the module's own later changes (its
            # channels-last copies, made right after) reached the converted model as NaNs.
            self.unet.to(memory_format=torch.contiguous_format)
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: fine per shape
                    traced = self.unet if len(example) == 3 else _WithGuidance(self.unet)
                    model = self.ov.convert_model(traced, example_input=example, share_weights=False)
            finally:
                self.unet.to(memory_format=torch.channels_last)
            tmp = xml.parent.with_name(f"{self._key}.{os.getpid()}.tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            self.ov.save_model(model, str(tmp / "unet.xml"), compress_to_fp16=False)
            del model
            if xml.parent.exists():  # another process got there first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, xml.parent)
        return self.core.read_model(str(xml))

    def _compile(self, shape: tuple, example: tuple[torch.Tensor, ...]):
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}  # as many as torch uses (--threads)
        dims = "_".join("x".join(map(str, s)) for s in shape)
        blob = self.cache / self._key / f"{dims}-{config['INFERENCE_NUM_THREADS']}t-ov{self.ov.__version__.split('-')[0]}.blob"
        if blob.is_file():
            try:
                mapped = np.memmap(blob, dtype=np.uint8, mode="c")  # copy-on-write: OpenVINO wants a writeable array
                compiled = self.core.import_model(self.ov.Tensor(mapped, shared_memory=True), "CPU", config)
                return compiled, mapped  # (the mapping lives as long as the compiled model)
            except Exception:  # noqa: BLE001 - a blob this OpenVINO cannot read: compile afresh and replace it
                pass
        if self._model is None:
            self._model = self._converted(example)
        model = self._model.clone()
        model.reshape({i: list(s) for i, s in enumerate(shape)})
        compiled = self.core.compile_model(model, "CPU", config)
        tmp = blob.with_name(f"{blob.name}.{os.getpid()}.tmp")
        try:
            exported = compiled.export_model()  # bytes, or an io.BytesIO in newer OpenVINO releases
            with open(tmp, "wb") as f:
                f.write(exported.getbuffer() if hasattr(exported, "getbuffer") else exported)
            os.replace(tmp, blob)
        except OSError as e:  # a full or read-only disk costs the next run a compile, not this run its picture
            tmp.unlink(missing_ok=True)
            warnings.warn(f"plainsd: could not keep the compiled model in {blob.parent}: {e}")
        else:
            try:
                prune_cache(self.cache, cache_limit(), keep=self._key)
            except OSError:  # another run pruning the same cache at the same moment: its business
                pass
        return compiled, None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        t = t.to(torch.float32).reshape(-1).expand(x.shape[0]).contiguous()
        x32, c32 = x.float().contiguous(), context.float().contiguous()
        inputs = (x32, t, c32)
        lcm = getattr(self.unet.config, "time_cond_proj_dim", 0) > 0
        if guidance is None and lcm:
            raise ValueError("this UNet is LCM-distilled: under OpenVINO each call must give its guidance scale")
        if guidance is not None and not lcm:
            raise ValueError("this UNet has no guidance-scale embedding (it is not LCM-distilled): call it without "
                             "guidance")
        if guidance is not None:
            inputs += (torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(x.shape[0]).contiguous(),)
        if self._key is None or self._versions != self._current_versions():
            cfg = getattr(self.unet, "config", None)
            self._key = fingerprint(self.unet, json.dumps(cfg.__dict__ if cfg is not None else {}, default=str)
                                    + self.precision + code_version())
            self._versions = self._current_versions()
            self._model, self._compiled = None, {}
            try:
                os.utime(self.cache / self._key)  # its last use, for pruning
            except OSError:  # not in the cache (yet)
                pass
        shape = tuple(tuple(i.shape) for i in inputs)
        if shape not in self._compiled:
            compiled, mapped = self._compile(shape, inputs)
            self._compiled[shape] = (compiled.create_infer_request(), mapped)
        out = self._compiled[shape][0].infer([i.numpy() for i in inputs])
        return torch.from_numpy(out[0].copy()).to(x.dtype)
