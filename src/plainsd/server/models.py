"""The models a server offers: one file, or the checkpoints found in a models folder.

Clients choose among them by A1111's title ("name.safetensors [hash]"), file name or stem; a name is only
ever looked up in the list found on disk, never turned into a path, so no client reaches another file.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import plainsd
from plainsd import runtime, vaes
from plainsd.weights import DEFAULT_MODEL, load_vae, read_config

SUFFIXES = (".safetensors", ".ckpt", ".pt")


@dataclass
class ModelEntry:
    name: str          # path relative to the models folder, e.g. "sub/model.safetensors"
    path: Path | None  # None: the random tiny model used when nothing is shipped
    sha256: str | None = None

    @property
    def model_name(self) -> str:
        return self.name.rsplit(".", 1)[0] if self.path is not None and self.path.is_file() else self.name

    @property
    def hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def describe(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": self.sha256,
                "filename": str(self.path) if self.path else self.name, "config": None}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ModelStore:
    """Finds the models, loads one at a time (lazily), switches on request."""

    def __init__(self, model: str | Path | None = None, models_dir: str | Path | None = None,
                 precision: str = "auto", backend: str = "eager", vae_dir: str | Path | None = None):
        runtime.choose_dtype(precision)
        if backend not in runtime.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(runtime.BACKENDS)}")
        self.precision, self.backend = precision, backend
        if model is not None and models_dir is not None:
            raise ValueError("give either a model file or a models folder, not both")
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.single = Path(model) if model is not None else None
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise ValueError(f"models folder {self.models_dir} does not exist")
        if self.single is not None and not self.single.exists():
            raise ValueError(f"model {self.single} does not exist")
        self._lock = threading.Lock()
        self._hashes: dict[tuple, str] = {}
        self.vae_dir = vae_dir
        self._vaes = vaes.find_vaes(vae_dir, self.models_dir)  # (A1111 lists them at start and on refresh-vae)
        self._vae: tuple[Path, object] | None = None  # the VAE file loaded last
        self._entries = self.scan()
        if not self._entries:
            raise ValueError(f"no checkpoints ({', '.join(SUFFIXES)} files or diffusers folders) in {self.models_dir}")
        self.current = self._entries[0]
        self._loaded: tuple[str, runtime.Engine] | None = None

    def scan(self) -> list[ModelEntry]:
        if self.single is not None:
            paths = [(self.single.name, self.single)]
        elif self.models_dir is not None:
            paths = []
            for p in sorted(self.models_dir.rglob("*")):
                if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith(".") and not vaes.is_vae_file(p):
                    paths.append((p.relative_to(self.models_dir).as_posix(), p))
                elif p.is_dir() and (p / "model_index.json").is_file():
                    paths.append((p.relative_to(self.models_dir).as_posix(), p))
        elif DEFAULT_MODEL.is_file():
            paths = [(DEFAULT_MODEL.name, DEFAULT_MODEL)]
        else:
            return [ModelEntry("tiny-random", None)]
        return [ModelEntry(name, path, self._sha256(path)) for name, path in paths]

    def _sha256(self, path: Path) -> str | None:
        if not path.is_file():
            return None
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return self._hashes[key]

    def vaes(self) -> dict[str, Path]:
        """name -> file: the VAEs found at start or at the last refresh_vaes (A1111's /sdapi/v1/sd-vae)."""
        return dict(self._vaes)

    def refresh_vaes(self):
        with self._lock:
            self._vaes = vaes.find_vaes(self.vae_dir, self.models_dir)

    def vae_for(self, setting: str | None, entry: ModelEntry | None = None) -> Path | None:
        """The VAE file the sd_vae setting asks for with this model (None: its own); an unknown name: ValueError."""
        entry = entry or self.current
        return vaes.resolve(setting, entry.path, self._vaes)

    def refresh(self):
        with self._lock:
            self._entries = self.scan() or self._entries
            titles = {e.name for e in self._entries}
            if self.current.name not in titles:
                self.current = self._entries[0]

    def entries(self) -> list[ModelEntry]:
        return list(self._entries)

    def find(self, name: str) -> ModelEntry:
        if isinstance(name, str):
            wanted = name.strip()
            for e in self._entries:
                if wanted in (e.title, e.name, e.model_name, e.hash):
                    return e
            # A1111 clients sometimes send "name [otherhash]" or a stem with a different hash
            stem = wanted.split(" [")[0]
            for e in self._entries:
                if stem in (e.name, e.model_name):
                    return e
        raise ValueError(f"unknown model {name!r}; available: {', '.join(e.title for e in self._entries)}")

    def select(self, name: str) -> ModelEntry:
        entry = self.find(name)
        with self._lock:
            self.current = entry
        return entry

    def get(self, entry: ModelEntry | None = None, vae: Path | None = None) -> runtime.Engine:
        """The current model (or `entry`), loaded on first use and prepared to run; only one is kept in memory.
        vae: a VAE file to decode with (vae_for), or None for the model's own; the last one loaded is kept."""
        with self._lock:
            engine = self._engine(entry)
            self._put_vae(engine, vae)
            return engine

    def model(self, entry: ModelEntry | None = None) -> runtime.Engine:
        """As get, but the engine's VAE left as it is (for reading the model: a job may be drawing with it)."""
        with self._lock:
            return self._engine(entry)

    def use_vae(self, engine: runtime.Engine, vae: Path | None) -> None:
        """Decode with this VAE file (vae_for; None: the model's own) on a model get() gave."""
        with self._lock:
            self._put_vae(engine, vae)

    def _put_vae(self, engine: runtime.Engine, vae: Path | None) -> None:
        if vae is not None and (self._vae is None or self._vae[0] != vae):
            self._vae = (vae, load_vae(vae, dtype=engine.sd.dtype))
        engine.use_vae(self._vae[1] if vae is not None else None)

    def _engine(self, entry: ModelEntry | None) -> runtime.Engine:
        """The model of `entry` (default: the current one), loaded and prepared if it is not the one in memory."""
        entry = entry or self.current
        if self._loaded is None or self._loaded[0] != entry.name:
            self._loaded = None
            if entry.path is None:
                sd = plainsd.build("tiny", seed=0).to(runtime.choose_dtype(self.precision))
                sd.name = entry.name
            else:  # (SDXL on a CPU without native bf16: fp16 weights, runtime/storage.py)
                sd = plainsd.load(entry.path, dtype=runtime.choose_dtype(self.precision, read_config(entry.path)))
            sd.hash = entry.hash
            self._loaded = (entry.name, runtime.prepare(sd, self.backend))
        return self._loaded[1]
