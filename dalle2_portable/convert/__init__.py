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
from . import karlo as karlo_layout
from .hub import Snapshot, snapshot

# layout name -> its converter module (CONFIG_PATTERNS, weight_folders, and the converting function)
_LAYOUTS = {clip_layout.LAYOUT: clip_layout, karlo_layout.LAYOUT: karlo_layout}
LAYOUTS = tuple(_LAYOUTS)
DTYPES = tuple(store.OUT_DTYPES)
_PROBE = ["config.json", "model_index.json", "model.json"]


def cache_dir() -> Path:
    return Path(os.environ.get("DALLE2_CACHE") or Path.home() / ".cache" / "dalle2_portable")


def detect_layout(folder: Path) -> str:
    if (folder / store.MODEL_JSON).is_file():
        return "dalle2_portable"
    if (folder / "model_index.json").is_file():
        karlo_layout.pipeline_class(folder)  # a diffusers pipeline we do not convert is a one-line error here
        return karlo_layout.LAYOUT
    config = folder / "config.json"
    if config.is_file():
        model_type = clip_layout.read_json(config).get("model_type", "")
        if model_type.startswith("clip"):
            return clip_layout.LAYOUT
        raise Dalle2Error(f"{str(config)!r}: model_type {model_type!r} is not supported; supported layouts: "
                          f"{', '.join(LAYOUTS)}")
    raise Dalle2Error(f"{str(folder)!r} holds no config.json or model_index.json; give a Hub repo id or a "
                      "folder saved with transformers/diffusers `save_pretrained`")


def _weight_patterns(folders: dict[str, tuple[str, str]], kind: str, variant: str | None) -> list[str]:
    v = f".{variant}" if variant else ""
    out = []
    for sub, (st_stem, bin_stem) in folders.items():
        prefix = f"{sub}/" if sub else ""
        stem, ext = (st_stem, "safetensors") if kind == "safetensors" else (bin_stem, "bin")
        out += [f"{prefix}{stem}{v}.{ext}", f"{prefix}{stem}{v}.{ext}.index.json", f"{prefix}{stem}-*{v}.{ext}"]
    return out


def _has_safetensors(folder: Path, stem: str, variant: str | None) -> bool:
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    return (folder / name).is_file() or (folder / f"{name}.index.json").is_file()


def probe(source: str | os.PathLike, revision: str | None = None) -> tuple[Snapshot, str]:
    """The source's index files (a Hub revision resolved to its commit) and its layout name."""
    snap = snapshot(source, revision, allow_patterns=_PROBE)
    return snap, detect_layout(snap.path)


def fetch(source: str | os.PathLike, revision: str | None = None, variant: str | None = None,
          probed: tuple[Snapshot, str] | None = None) -> tuple[Snapshot, str]:
    """The source's files on disk and its layout name. From the Hub only what the layout needs is downloaded:
    configs, then each component's safetensors, and its `.bin` only where it has no safetensors."""
    first, layout = probed or probe(source, revision)
    if first.is_local or layout == "dalle2_portable":
        return first, layout
    module = _LAYOUTS[layout]
    pin = first.revision  # the commit the probe resolved: every later download comes from the same one
    folders = module.weight_folders(first.path)
    patterns = module.CONFIG_PATTERNS + _weight_patterns(folders, "safetensors", variant)
    snap = snapshot(source, pin, allow_patterns=patterns)
    missing = {k: v for k, v in folders.items() if not _has_safetensors(snap.path / k, v[0], variant)}
    if missing:
        snap = snapshot(source, pin, allow_patterns=patterns + _weight_patterns(missing, "bin", variant))
    return snap, layout


def _write(snap: Snapshot, layout: str, out_dir: Path, dtype: str, overwrite: bool,
           variant: str | None = None) -> ModelSpec:
    if dtype not in DTYPES:
        raise Dalle2Error(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if layout == "dalle2_portable":
        raise Dalle2Error(f"{str(snap.path)!r} is already a dalle2_portable model directory; load it directly")
    source = Source(repo=snap.repo, revision=snap.revision, layout=layout)
    with store.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if layout == karlo_layout.LAYOUT:
            return karlo_layout.convert_karlo(snap.path, tmp, source, dtype, variant)
        return clip_layout.convert_clip(snap.path, tmp, source, dtype, variant)


def convert(source: str | os.PathLike, out_dir: str | os.PathLike, revision: str | None = None,
            dtype: str = "float32", overwrite: bool = False, variant: str | None = None) -> ModelSpec:
    """Convert a Hub repo id (at `revision`) or a local reference folder into the model directory `out_dir`.

    `variant` reads diffusers/transformers variant weight files (e.g. "fp16": `*.fp16.safetensors`); `dtype`
    is what is written. The directory appears complete or not at all. An existing `out_dir` is an error unless
    `overwrite`.
    """
    if Path(out_dir).exists() and not overwrite:  # fail before downloading anything
        raise Dalle2Error(f"output {str(out_dir)!r} already exists; choose another path or pass --overwrite")
    snap, layout = fetch(source, revision, variant)
    return _write(snap, layout, Path(out_dir), dtype, overwrite, variant)


def _fingerprint(folder: Path) -> str:
    """Changes when any top-level file of a local reference folder changes (name, size, mtime)."""
    h = hashlib.sha1(str(folder.absolute()).encode())
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def resolve_model(model: str | os.PathLike, revision: str | None = None, variant: str | None = None) -> Path:
    """A model directory for `model`: used as is if it is one, otherwise converted once into the cache, keyed by
    repo and resolved commit (local folders: by a fingerprint of their files) and variant. A cached directory is
    reused without reading the source's weights again."""
    path = Path(model).expanduser()
    if (path / store.MODEL_JSON).is_file():
        return path
    probed = probe(model, revision)
    snap, layout = probed
    if layout == "dalle2_portable":
        return snap.path
    suffix = f"-{variant}" if variant else ""
    if snap.is_local:
        target = cache_dir() / "local" / f"{snap.path.name}-{_fingerprint(snap.path)}{suffix}"
    else:
        target = cache_dir() / "hub" / snap.repo.replace("/", "--") / f"{snap.revision}{suffix}"
    if (target / store.MODEL_JSON).is_file():
        return target  # converted before: the source's weights are not even downloaded
    snap, layout = fetch(model, revision, variant, probed)
    _write(snap, layout, target, "float32", overwrite=True, variant=variant)
    return target


__all__ = ["convert", "resolve_model", "probe", "fetch", "cache_dir", "LAYOUTS"]
