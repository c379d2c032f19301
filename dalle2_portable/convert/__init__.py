"""Converters: reference checkpoints (Hub ids or local folders) -> model directories.

`convert(source, out_dir)` writes one model directory atomically. `resolve_model(model)` is what the loaders
call: "default" is the packaged model (dalle2_portable/default_model); a model directory is used as it is; a
Hub id or a reference folder is converted once into the cache (DALLE2_CACHE, default ~/.cache/dalle2_portable),
keyed by repo and resolved commit, and reused after that.

Both go through the same two steps: `probe` resolves the source once (a Hub revision to its commit, downloading
only the index files) and learns its layout and weight files; `_convert_into` takes that `Probe`, downloads the
weights at the same commit and writes the directory. The layout modules (`clip.py`, `karlo.py`) share their
reading helpers through `files.py` and `weights.py`, never each other.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .. import store
from ..errors import Dalle2Error
from ..spec import ModelSpec, Source
from . import clip as clip_layout
from . import karlo as karlo_layout
from .files import read_json
from .hub import Snapshot, download, snapshot
from .weights import conversion_progress, source_bytes

# layout name -> its converter module (LAYOUT, CONFIG_PATTERNS, weight_folders, and the converting function)
_LAYOUTS = {clip_layout.LAYOUT: clip_layout, karlo_layout.LAYOUT: karlo_layout}
LAYOUTS = tuple(_LAYOUTS)
DTYPES = tuple(store.OUT_DTYPES)
MODEL_DIR = "dalle2_portable"  # the layout of a model directory: used as it is, never converted
_PROBE = ["config.json", "model_index.json", store.MODEL_JSON]


log = logging.getLogger("dalle2_portable")  # what converting into the cache does; the CLI prints it


def cache_dir() -> Path:
    return Path(os.environ.get("DALLE2_CACHE") or Path.home() / ".cache" / "dalle2_portable")


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


@dataclass(frozen=True)
class Probe:
    """What one look at a source learned, passed on to every later step: its index files on disk (a Hub
    revision resolved to the commit that every later download is pinned to), its layout, and {subfolder:
    (safetensors stem, .bin stem)} of the components with weights (none for a model directory)."""
    snap: Snapshot
    layout: str
    weights: dict[str, tuple[str, str]]


def probe(source: str | os.PathLike, revision: str | None = None) -> Probe:
    """Resolve `source` (a Hub id at `revision`, or a local folder) once and read its index files: the layout,
    and the weight files it needs."""
    snap = snapshot(source, revision, allow_patterns=_PROBE)
    folder = snap.path
    if (folder / store.MODEL_JSON).is_file():
        return Probe(snap, MODEL_DIR, {})
    if (folder / "model_index.json").is_file():
        return Probe(snap, karlo_layout.LAYOUT, karlo_layout.weight_folders(folder))
    config = folder / "config.json"
    if not config.is_file():
        raise Dalle2Error(f"{str(folder)!r} holds no config.json or model_index.json; give a Hub repo id or a "
                          "folder saved with transformers/diffusers `save_pretrained`")
    found = read_json(config)
    model_type = str(found.get("model_type", "")) if isinstance(found, dict) else ""
    if not model_type.startswith("clip"):
        raise Dalle2Error(f"{str(config)!r}: model_type {model_type!r} is not supported; supported layouts: "
                          f"{', '.join(LAYOUTS)}")
    return Probe(snap, clip_layout.LAYOUT, clip_layout.weight_folders(folder))


def _convert_into(probed: Probe, out_dir: Path, dtype: str, overwrite: bool, variant: str | None) -> ModelSpec:
    """Convert the probed source into `out_dir`, which appears complete or not at all. A local folder is read
    as it is; from the Hub, at the probed commit, only what the layout needs is downloaded: configs, then each
    component's safetensors, and its `.bin` only where it has no safetensors."""
    snap = probed.snap
    if not snap.is_local:
        patterns = (_LAYOUTS[probed.layout].CONFIG_PATTERNS
                    + _weight_patterns(probed.weights, "safetensors", variant))
        snap = download(snap.repo, snap.revision, patterns)
        missing = {k: v for k, v in probed.weights.items() if not _has_safetensors(snap.path / k, v[0], variant)}
        if missing:
            snap = download(snap.repo, snap.revision, patterns + _weight_patterns(missing, "bin", variant))
    source = Source(repo=snap.repo, revision=snap.revision, layout=probed.layout)
    total = sum(source_bytes(snap.path / k, *stems, variant) for k, stems in probed.weights.items())
    with store.atomic_directory(out_dir, overwrite=overwrite) as tmp, \
            conversion_progress(total, f"converting {snap.repo or snap.path.name}"):
        if probed.layout == karlo_layout.LAYOUT:
            return karlo_layout.convert_karlo(snap.path, tmp, source, dtype, variant)
        return clip_layout.convert_clip(snap.path, tmp, source, dtype, variant)


def convert(source: str | os.PathLike, out_dir: str | os.PathLike, revision: str | None = None,
            dtype: str = "float32", overwrite: bool = False, variant: str | None = None) -> ModelSpec:
    """Convert a Hub repo id (at `revision`) or a local reference folder into the model directory `out_dir`.

    `variant` reads diffusers/transformers variant weight files (e.g. "fp16": `*.fp16.safetensors`); `dtype`
    is what is written. The directory appears complete or not at all. An existing `out_dir` is an error unless
    `overwrite`.
    """
    # Fail before downloading anything.
    if Path(out_dir).exists() and not overwrite:
        raise Dalle2Error(f"output {str(out_dir)!r} already exists; choose another path or pass --force "
                          "(overwrite=True)")
    if dtype not in DTYPES:
        raise Dalle2Error(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    probed = probe(source, revision)
    if probed.layout == MODEL_DIR:
        raise Dalle2Error(f"{str(probed.snap.path)!r} is already a dalle2_portable model directory; load it "
                          "directly")
    return _convert_into(probed, Path(out_dir), dtype, overwrite, variant)


def _fingerprint(folder: Path) -> str:
    """Changes when any file of a local reference folder, in any subfolder, changes (path, size, mtime)."""
    h = hashlib.sha1(str(folder.absolute()).encode())
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def default_model() -> Path:
    """The packaged model's directory; one line saying how to get a model when this install has none."""
    path = Path(store.DEFAULT_MODEL_DIR)
    if not (path / store.MODEL_JSON).is_file():
        raise Dalle2Error(f"the default model is not in this install ({str(path)!r} has no {store.MODEL_JSON}); "
                          "pass a model, e.g. --model kakaobrain/karlo-v1-alpha (Python: "
                          "load_pipeline('kakaobrain/karlo-v1-alpha')), or build one with the recipe in README's "
                          "\"The default model\"")
    return path


def resolve_model(model: str | os.PathLike, revision: str | None = None, variant: str | None = None) -> Path:
    """A model directory for `model`: the string "default" is the packaged model (before any other lookup: a
    folder named default is "./default" or a Path); a model directory is used as is; anything else is converted
    once into the cache, keyed by repo and resolved commit (local folders: by a fingerprint of their files) and
    variant. A cached directory is reused without reading the source's weights again."""
    if isinstance(model, str) and model == store.DEFAULT:
        if revision is not None or variant is not None:
            raise Dalle2Error("the default model has no revisions or variants; drop --revision / --variant")
        return default_model()
    path = Path(model).expanduser()
    if (path / store.MODEL_JSON).is_file() and revision is None:
        return path
    probed = probe(model, revision)  # a local folder with a revision: one line, not ignored
    snap = probed.snap
    if probed.layout == MODEL_DIR:  # a model directory on the Hub: the files its model.json names, at the commit
        if snap.is_local:
            return snap.path
        spec = store.read_spec(snap.path)
        names = [store.MODEL_JSON, *(c.weights for c in spec.components.values())]
        return download(snap.repo, snap.revision, names + (["tokenizer/*"] if spec.tokenizer else [])).path
    suffix = f"-{variant}" if variant else ""
    if snap.is_local:
        target = cache_dir() / "local" / f"{snap.path.name}-{_fingerprint(snap.path)}{suffix}"
    else:
        target = cache_dir() / "hub" / snap.repo.replace("/", "--") / f"{snap.revision}{suffix}"
    if not (target / store.MODEL_JSON).is_file():  # else converted before: the source's weights are not fetched
        what = snap.repo if not snap.is_local else str(snap.path)
        log.info(f"converting {what} into the cache, once: {target} (`dalle2 cache list` shows the cache, "
                 "`dalle2 cache clear` empties it)")
        _convert_into(probed, target, "float32", overwrite=True, variant=variant)
        log.info(f"converted: {store.directory_size(target) / 1e6:,.1f} MB in {target}")
    return target


__all__ = ["convert", "resolve_model", "default_model", "probe", "Probe", "cache_dir", "LAYOUTS"]
