"""Paths a model.json names: relative, and inside its model directory (containment).

    relative_path("tokenizer/vocab.json", where)        # the path, checked; "../x", "/etc/x", "C:x": one line
    inside(model_dir, "decoder.safetensors", where)     # model_dir / rel, refused if a symlink leads out of it

A model directory is data a user may have downloaded from anyone, so it may name only its own files.

Temporary siblings, written beside a final path and renamed onto it (one naming for every atomic writer):

    temporary(path, "partial")        # path.parent / ".NAME.partial-PID-TOKEN": the writer's pid is in the name
    stale(path, ("partial", "old"))   # those siblings whose process is gone (SIGKILL, power loss)
    target_of(".NAME.partial-PID-TOKEN")   # "NAME"
"""

from __future__ import annotations

import glob
import os
import secrets
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


def temporary(path: Path, tag: str = "", suffix: str = "") -> Path:
    """A new name beside `path` for a write in progress: `.NAME.TAG-PID-TOKEN` (`.NAME.PID-TOKEN` with no tag),
    so that `stale` can tell a dead writer's leftovers from a live one's work."""
    return path.parent / f".{path.name}.{tag + '-' if tag else ''}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _parse(name: str) -> tuple[str, str, int] | None:
    """(target name, tag, pid) of a `temporary` name, else None."""
    if not name.startswith("."):
        return None
    for i in range(len(name) - 1, 1, -1):  # the target's own name may hold dots: try each split, last first
        if name[i] != ".":
            continue
        parts = name[i + 1:].split("-")  # [TAG,] PID, TOKEN
        tag, rest = ("", parts) if parts[0].isdigit() else (parts[0], parts[1:])
        if len(rest) == 2 and rest[0].isdigit() and rest[1]:
            return name[1:i], tag, int(rest[0])
    return None


def target_of(name: str) -> str | None:
    """The final name a `temporary` sibling was for, or None when `name` is not one."""
    parsed = _parse(name)
    return parsed[0] if parsed else None


def stale(path: Path, tags: tuple[str, ...] = ("",), suffix: str = "") -> list[Path]:
    """The `temporary(path, tag, suffix)` siblings of `path` whose writer is no longer running."""
    found = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*{glob.escape(suffix)}"):
        parsed = _parse(p.name[:len(p.name) - len(suffix)] if suffix else p.name)
        if parsed and parsed[0] == path.name and parsed[1] in tags and not process_alive(parsed[2]):
            found.append(p)
    return sorted(found)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True
