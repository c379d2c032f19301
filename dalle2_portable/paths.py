"""Paths a model.json names: relative, and inside its model directory (containment).

    relative_path("tokenizer/vocab.json", where)        # the path, checked; "../x", "/etc/x", "C:x": one line
    inside(model_dir, "decoder.safetensors", where)     # model_dir / rel, refused if a symlink leads out of it

A model directory is data a user may have downloaded from anyone, so it may name only its own files.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .errors import Dalle2Error


def relative_path(rel, where: str) -> str:
    """`rel` if it is a non-empty relative POSIX path without "..", else a one-line error naming `where`."""
    if not isinstance(rel, str) or not rel:
        raise Dalle2Error(f"{where}: a path must be a non-empty string, got {rel!r}; re-convert the model with "
                          "`dalle2 convert`")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise Dalle2Error(f"{where}: path {rel!r} leaves the model directory; a model directory may name only "
                          "its own files (relative paths, no '..')")
    return rel


def inside(directory: str | os.PathLike, rel: str, where: str) -> Path:
    """directory / rel, checked by `relative_path` and, symlinks followed, still inside `directory`."""
    path = Path(directory) / relative_path(rel, where)
    root = Path(directory).resolve()
    target = path.resolve()
    if target != root and root not in target.parents:
        raise Dalle2Error(f"{where}: {rel!r} is a link to {str(target)!r}, outside the model directory "
                          f"{str(directory)!r}; a model directory may name only its own files (copy the file in)")
    return path
