"""The conversion cache (`DALLE2_CACHE`, default ~/.cache/dalle2_portable): what is in it, and emptying it.

    for e in entries(): print(e.size, e.age_days, e.source, e.path)   # converted models, and leftovers
    remove(entries())                                                 # -> bytes freed

Hub sources are cached as hub/ORG--NAME/COMMIT[-VARIANT], local folders as local/NAME-FINGERPRINT[-VARIANT] (a
folder converted again is the same entry unless its files changed). A leftover is the temporary folder of a
conversion whose process is gone (killed with SIGKILL, or a machine that lost power): `store.leftovers`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import store
from .paths import target_of
from .convert import cache_dir
from .errors import Dalle2Error


@dataclass(frozen=True)
class Entry:
    path: Path
    source: str   # the Hub repo id @ commit, or the local folder converted; "(leftover)" for a leftover
    size: int     # bytes
    modified: float

    @property
    def age_days(self) -> float:
        return (time.time() - self.modified) / 86400


def entries(root: str | Path | None = None) -> list[Entry]:
    """Every converted model in the cache, and every leftover of an interrupted conversion, by path."""
    root = Path(root or cache_dir())
    found = []
    for group in (root / "hub", root / "local"):
        folders = [group] + ([p for p in group.iterdir() if p.is_dir() and not p.name.startswith(".")]
                             if group.is_dir() else [])
        for folder in folders:
            if not folder.is_dir():
                continue
            # the targets: each entry, and each name a temporary folder was for (a first conversion killed
            # leaves a `.NAME.partial-*` with no NAME beside it)
            names = {p.name if not p.name.startswith(".") else target_of(p.name) for p in folder.iterdir()}
            names.discard(None)
            for name in sorted(names):
                p = folder / name
                if (p / store.MODEL_JSON).is_file():
                    found.append(Entry(p, _source(p), store.directory_size(p), p.stat().st_mtime))
                for left in store.leftovers(p):
                    found.append(Entry(left, "(leftover of an interrupted conversion)", store.directory_size(left),
                                       left.stat().st_mtime))
    return sorted(found, key=lambda e: str(e.path))


def _source(path: Path) -> str:
    try:
        source = store.read_spec(path).source
    except Dalle2Error:
        return "(unreadable model.json)"
    return f"{source.repo}@{source.revision}" if source.revision else source.repo


def select(names: list[str], root: str | Path | None = None) -> list[Entry]:
    """The entries each name picks: a path of `entries()`, or a source (repo id, repo@commit or folder)."""
    every = entries(root)
    chosen = []
    for name in names:
        hits = [e for e in every if name in (str(e.path), e.path.name, e.source, e.source.split("@")[0])]
        if not hits:
            raise Dalle2Error(f"nothing in the cache {str(Path(root or cache_dir()))!r} is {name!r}; "
                              "`dalle2 cache list` shows what is there")
        chosen += [e for e in hits if e not in chosen]
    return chosen


def remove(chosen: list[Entry]) -> int:
    """Delete the entries; returns the bytes freed."""
    freed = 0
    for e in chosen:
        shutil.rmtree(e.path, ignore_errors=True)
        freed += e.size
    return freed
