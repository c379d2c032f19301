"""A Hub repo id (with a revision) or a local path -> a local folder, through huggingface_hub.

Honours the Hub's own settings, read at call time so a process can change them: HF_HOME, HF_HUB_CACHE (where
snapshots live) and HF_HUB_OFFLINE (use the cache, never the network). Downloads only the files a converter
asks for (`allow_patterns`), so a repo that stores weights twice (.bin and .safetensors) costs one copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants

from ..errors import Dalle2Error

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Snapshot:
    path: Path  # local folder holding the files
    repo: str  # Hub repo id, or the absolute local path
    revision: str | None  # the commit hash the snapshot is at (None for a local folder)
    is_local: bool


def hub_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def looks_like_repo_id(source: str) -> bool:
    """'org/name' with no path-like parts (a local folder that exists always wins)."""
    parts = str(source).split("/")
    return len(parts) == 2 and all(parts) and not str(source).startswith((".", "~")) and "\\" not in str(source)


def snapshot(source: str | os.PathLike, revision: str | None = None,
             allow_patterns: list[str] | None = None) -> Snapshot:
    """Resolve `source` to a local folder: an existing directory as it is, else a Hub repo id downloaded (only
    `allow_patterns`) into the Hub cache, or found there when offline; its revision is resolved to a commit."""
    path = Path(source).expanduser()
    if path.is_dir():
        if revision is not None:  # not silently ignored: the user meant some version, and would not get it
            raise Dalle2Error(f"{str(source)!r} is a local folder, read as it is; a revision ({revision!r}) applies to "
                              "Hub repo ids only: leave it out (--revision in the CLI)")
        return Snapshot(path.absolute(), str(path.absolute()), None, True)
    if path.exists():
        raise Dalle2Error(f"{str(source)!r} is a file; give a model folder or a Hub repo id like 'org/name'")
    if not looks_like_repo_id(str(source)):
        raise Dalle2Error(f"{str(source)!r} is neither an existing folder nor a Hub repo id like 'org/name'; "
                          "check the path")
    return download(str(source), revision, allow_patterns)


def download(repo: str, revision: str | None, allow_patterns: list[str] | None) -> Snapshot:
    """The files `allow_patterns` of Hub repo `repo` at `revision` (a later call passes the commit an earlier
    one resolved, so that all files come from the same commit)."""
    # Imported here, not at the top: huggingface_hub's download machinery (httpx) takes ~0.3 s to import, and
    # loading a model directory, or converting a local folder, never needs it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f"{repo}@{revision}" if revision else repo
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=allow_patterns,
                                   cache_dir=hub_cache_dir(), local_files_only=hub_offline())
    except GatedRepoError:
        raise Dalle2Error(f"{at} is gated on the Hub; accept its licence on the website and log in with "
                          "`hf auth login`") from None
    except RepositoryNotFoundError:
        raise Dalle2Error(f"{at} was not found on the Hub; check the repo id (and your login for private "
                          "repos)") from None
    except RevisionNotFoundError:
        raise Dalle2Error(f"{at}: revision not found on the Hub; check --revision") from None
    except HFValidationError as e:
        raise Dalle2Error(f"{repo!r} is not a valid Hub repo id ({e})") from None
    except LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub cannot be reached"
        raise Dalle2Error(f"{at} is not in the local Hub cache ({hub_cache_dir()}) and {how}; download it once "
                          "while online, or point at a local folder") from None
    except OSError as e:  # connection errors and the like
        raise Dalle2Error(f"cannot download {at}: {e}; check the network or set HF_HUB_OFFLINE=1 to use the "
                          "cache") from None
    folder = Path(folder)
    return Snapshot(folder, repo, folder.name, False)  # snapshots/<commit hash>
