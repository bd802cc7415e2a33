"""The output folder of a batch: the pictures, each written whole (a temporary name, then a rename), and
manifest.jsonl, one line per drawn request, appended only after its pictures are in place. A request counts as
done when the manifest has its key and its pictures are all there, so a stopped batch reruns only the rest."""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "manifest.jsonl"


def done(folder: str | Path) -> dict[str, dict]:
    """key -> manifest entry of each request whose pictures are all in the folder. A line that is not JSON (the
    last one of a run killed while appending it) counts as not done."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return {}
    entries = {}
    for text in manifest.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "key" in entry:
            entries[entry["key"]] = entry
    return {key: e for key, e in entries.items() if all((Path(folder) / name).is_file() for name in e.get("files", []))}


def write_file(path: Path, data: bytes) -> None:
    """Write bytes to path whole or not at all: a temporary name beside it, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def record(folder: str | Path, job, drawn) -> dict:
    """A drawn request's pictures written, then its manifest line appended (one write, flushed to disk)."""
    folder = Path(folder)
    for name, data in zip(job.files, drawn.pictures):
        write_file(folder / name, data)
    entry = {"line": job.line, "key": job.key, "files": job.files, "seeds": drawn.seeds,
             "infotexts": drawn.infotexts}
    line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
    with open(folder / MANIFEST, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:  # a line a killed run left half written is ended first: this one stays whole
            f.seek(-1, os.SEEK_END)
            line = (b"" if f.read(1) == b"\n" else b"\n") + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return entry
