"""Converters: reference checkpoints (Hub ids or local folders) -> model directories.

`convert(source, out_dir)` writes one model directory atomically. `resolve_model(model)` is what the loaders
call: a model directory is used as it is; a Hub id or a reference folder is converted once into the cache
(DALLE2_CACHE, default ~/.cache/dalle2_portable), keyed by repo and resolved commit, and reused after that.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .. import store
from ..errors import Dalle2Error
from ..spec import ModelSpec, Source
from . import clip as clip_layout
from .hub import Snapshot, snapshot

LAYOUTS = ("transformers-clip",)
DTYPES = tuple(store.OUT_DTYPES)
_PROBE = ["config.json", "model_index.json", "model.json"]


def cache_dir() -> Path:
    return Path(os.environ.get("DALLE2_CACHE") or Path.home() / ".cache" / "dalle2_portable")


def detect_layout(folder: Path) -> str:
    if (folder / store.MODEL_JSON).is_file():
        return "dalle2_portable"
    if (folder / "model_index.json").is_file():
        raise Dalle2Error(f"{str(folder)!r} is a diffusers pipeline (model_index.json); this version converts "
                          f"only {', '.join(LAYOUTS)} checkpoints")
    config = folder / "config.json"
    if config.is_file():
        model_type = clip_layout.read_json(config).get("model_type", "")
        if model_type.startswith("clip"):
            return "transformers-clip"
        raise Dalle2Error(f"{str(config)!r}: model_type {model_type!r} is not supported; supported layouts: "
                          f"{', '.join(LAYOUTS)}")
    raise Dalle2Error(f"{str(folder)!r} holds no config.json or model_index.json; give a Hub repo id or a "
                      "folder saved with transformers/diffusers `save_pretrained`")


def fetch(source: str | os.PathLike, revision: str | None = None) -> tuple[Snapshot, str]:
    """The source's files on disk (downloading only what its layout needs) and its layout name."""
    probe = snapshot(source, revision, allow_patterns=_PROBE)
    layout = detect_layout(probe.path)
    if probe.is_local or layout == "dalle2_portable":
        return probe, layout
    pin = probe.revision  # the commit the probe resolved: every later download comes from the same one
    snap = snapshot(source, pin, allow_patterns=clip_layout.CONFIG_PATTERNS + clip_layout.SAFETENSORS_PATTERNS)
    if not any(snap.path.glob("model*.safetensors")):
        snap = snapshot(source, pin, allow_patterns=clip_layout.CONFIG_PATTERNS + clip_layout.BIN_PATTERNS)
    return snap, layout


def _write(snap: Snapshot, layout: str, out_dir: Path, dtype: str, overwrite: bool) -> ModelSpec:
    if dtype not in DTYPES:
        raise Dalle2Error(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if layout == "dalle2_portable":
        raise Dalle2Error(f"{str(snap.path)!r} is already a dalle2_portable model directory; load it directly")
    source = Source(repo=snap.repo, revision=snap.revision, layout=layout)
    with store.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        return clip_layout.convert_clip(snap.path, tmp, source, dtype)


def convert(source: str | os.PathLike, out_dir: str | os.PathLike, revision: str | None = None,
            dtype: str = "float32", overwrite: bool = False) -> ModelSpec:
    """Convert a Hub repo id (at `revision`) or a local reference folder into the model directory `out_dir`.

    The directory appears complete or not at all. An existing `out_dir` is an error unless `overwrite`.
    """
    if Path(out_dir).exists() and not overwrite:  # fail before downloading anything
        raise Dalle2Error(f"output {str(out_dir)!r} already exists; choose another path or pass --overwrite")
    snap, layout = fetch(source, revision)
    return _write(snap, layout, Path(out_dir), dtype, overwrite)


def _fingerprint(folder: Path) -> str:
    """Changes when any top-level file of a local reference folder changes (name, size, mtime)."""
    h = hashlib.sha1(str(folder.absolute()).encode())
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def resolve_model(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A model directory for `model`: used as is if it is one, otherwise converted once into the cache."""
    path = Path(model).expanduser()
    if (path / store.MODEL_JSON).is_file():
        return path
    snap, layout = fetch(model, revision)
    if layout == "dalle2_portable":
        return snap.path
    if snap.is_local:
        target = cache_dir() / "local" / f"{snap.path.name}-{_fingerprint(snap.path)}"
    else:
        target = cache_dir() / "hub" / snap.repo.replace("/", "--") / str(snap.revision)
    if (target / store.MODEL_JSON).is_file():
        return target
    _write(snap, layout, target, "float32", overwrite=True)
    return target


__all__ = ["convert", "resolve_model", "fetch", "cache_dir", "LAYOUTS"]
