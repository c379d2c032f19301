"""SHA-256 checksums of a model directory's files: recorded in model.json's "files", verified when loading.

    "files": {"text_encoder.safetensors": {"size": 1234, "sha256": "9f86d0..."}, "tokenizer/vocab.json": {...}}

Keys are paths relative to the model directory (POSIX separators): every weight file a component names and
every file under tokenizer/. `store.write_spec` records them from the files as they are on disk, so every
writer of a model directory (the converters, the training loop) records them without doing anything.

What loading checks (`verify`, called per component by `store.validate`), and what it costs (SHA-256 runs at
~1.4 GB/s on one core of the 2-core x86-64 development machine, page cache warm; a disk read is slower):
- every listed file's size, always (a stat);
- a file of at most SMALL_FILE bytes (64 MiB, ~50 ms): hashed on every load;
- a bigger file: hashed once, then remembered in DALLE2_CACHE/verified.json by (device, inode, size,
  mtime_ns) with the hash it had, and trusted while all four and the recorded hash stay the same. A file
  written by `write_spec` is remembered as it is hashed, so loading a model just converted hashes nothing;
  Karlo's 13.6 GB would otherwise cost ~10 s per load. A copy (another inode) or a rewrite (another mtime)
  is hashed again. Corruption that keeps size and mtime (bit rot on disk) is only caught by `full`;
- `full` (the packaged default model on every load; `dalle2 verify` for any model): every file, no cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from .errors import Dalle2Error
from .paths import inside, relative_path, temporary

SMALL_FILE = 64 << 20  # bytes: files up to this size are hashed on every load
CACHE_NAME = "verified.json"
CACHE_ENTRIES = 4096  # the cache keeps the newest entries
_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def parse(value, where: str) -> dict[str, dict] | None:
    """model.json's "files" (None when absent: written before checksums were recorded), checked."""
    if value is None:
        return None
    fix = "record them again with `dalle2 verify MODEL --record`"
    if not isinstance(value, dict):
        raise Dalle2Error(f"{where}: \"files\" must be an object of path -> {{size, sha256}}; {fix}")
    for rel, entry in value.items():
        relative_path(rel, f"{where} \"files\"")
        ok = (isinstance(entry, dict) and set(entry) == {"size", "sha256"} and type(entry["size"]) is int
              and isinstance(entry["sha256"], str) and _HEX.fullmatch(entry["sha256"]))
        if not ok:
            raise Dalle2Error(f"{where}: \"files\" entry {rel!r} must be {{\"size\": bytes, \"sha256\": 64 lowercase "
                              f"hex digits}}; {fix}")
    return value


def record(directory: str | os.PathLike, rels: list[str]) -> dict[str, dict]:
    """{rel: {size, sha256}} of the files `rels` of `directory`; big files are remembered as verified."""
    directory = Path(directory)
    out, seen = {}, {}
    for rel in rels:
        path = directory / rel
        if not path.is_file():
            raise Dalle2Error(f"cannot record the checksum of {str(path)!r}: the file is missing; write every file "
                              "before model.json")
        st = path.stat()
        out[rel] = {"size": st.st_size, "sha256": sha256_file(path)}
        if st.st_size > SMALL_FILE:
            seen[_key(st)] = _stamp(st, out[rel]["sha256"])
    _remember(seen)
    return out


def verify(directory: str | os.PathLike, files: dict[str, dict], rels: list[str], fix: str,
           full: bool = False) -> int:
    """Check the files `rels` (those of them `files` lists) against their recorded size and SHA-256: one line
    naming the first bad file, then `fix`. `full`: hash every file, ignoring the cache. Returns bytes hashed."""
    directory = Path(directory)
    cache = {} if full else _load()
    hashed, seen = 0, {}
    for rel in rels:
        if rel not in files:
            continue
        entry, path = files[rel], inside(directory, rel, f"model.json \"files\"")
        what = "weight file" if rel.endswith(".safetensors") else "file"
        try:
            st = path.stat()
        except FileNotFoundError:
            raise Dalle2Error(f"{what} {str(path)!r} is missing; {fix}") from None
        if st.st_size != entry["size"]:
            raise Dalle2Error(f"{what} {str(path)!r} is corrupted ({st.st_size} bytes, model.json records "
                              f"{entry['size']}); {fix}")
        big = st.st_size > SMALL_FILE
        if big and not full and cache.get(_key(st)) == _stamp(st, entry["sha256"]):
            continue
        hashed += st.st_size
        if sha256_file(path) != entry["sha256"]:
            raise Dalle2Error(f"{what} {str(path)!r} is corrupted (sha256 mismatch); {fix}")
        if big:
            seen[_key(st)] = _stamp(st, entry["sha256"])
    _remember(seen)
    return hashed


# -- the cache of verified big files: DALLE2_CACHE/verified.json, {"dev:ino": {size, mtime_ns, sha256}} -----

def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def _stamp(st: os.stat_result, sha256: str) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _cache_file() -> Path:
    from .convert import cache_dir  # the converters' cache folder (DALLE2_CACHE)

    return cache_dir() / CACHE_NAME


def _load() -> dict:
    """The cache; a missing or unreadable one is empty (it only saves time)."""
    try:
        d = json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _remember(seen: dict) -> None:
    """Add entries to the cache, atomically; a read-only or full cache folder is no error (only time is lost).
    Two processes writing at once may lose an entry, which is then hashed once more."""
    if not seen:
        return
    cache = {k: v for k, v in _load().items() if k not in seen}
    cache.update(seen)
    cache = dict(list(cache.items())[-CACHE_ENTRIES:])
    path = _cache_file()
    tmp = temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
