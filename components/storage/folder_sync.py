"""Artifact folders between a local working copy and the storage root.

Training, evaluation and merging write local folders (diffusers, matplotlib and accelerate
want paths). On a local storage root the working folder *is* the stored folder, so nothing
is copied; on S3 the folder is uploaded file by file (each write atomic) with a `_COMPLETE`
marker written last, and downloaded into a local cache keyed by the same relative path.
"""

from __future__ import annotations

import os
from pathlib import Path

from components.storage.storage import Storage

COMPLETE = "_COMPLETE"  # written last: a stored folder without it is an interrupted upload
DEFAULT_CACHE = "~/.cache/lcmlora/work"


def work_dir(storage: Storage, rel: str, cache: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """The local folder that holds `rel`: the stored folder itself for a local root."""
    if not storage.is_s3:
        return Path(storage.url(rel))
    return Path(os.path.expanduser(str(cache))) / storage.bucket / storage.key(rel)


def is_complete(storage: Storage, rel: str) -> bool:
    """True when the stored folder `rel` was written to the end."""
    return storage.exists(f"{rel}/{COMPLETE}")


def push_folder(storage: Storage, local: str | os.PathLike, rel: str) -> list[str]:
    """Store every file of `local` below `rel`, then the completion marker; returns the names."""
    local = Path(local)
    if not local.is_dir():
        raise FileNotFoundError(f"{local}: no folder to store at {storage.url(rel)}")
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and p.name != COMPLETE)
    if storage.is_s3:
        for name in names:
            storage.put_file(local / name, f"{rel}/{name}")
    storage.write_text(f"{rel}/{COMPLETE}", "\n".join(names) + "\n")
    return names


def pull_folder(storage: Storage, rel: str, cache: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """A local copy of the complete stored folder `rel` (no copy for a local root)."""
    if not is_complete(storage, rel):
        raise FileNotFoundError(f"{storage.url(rel)}: no complete folder there (missing {COMPLETE}); rerun its stage")
    local = work_dir(storage, rel, cache)
    if storage.is_s3:
        for name in storage.read_text(f"{rel}/{COMPLETE}").split():
            target = local / name
            if not target.exists() or target.stat().st_size != storage.size(f"{rel}/{name}"):
                target.parent.mkdir(parents=True, exist_ok=True)
                storage.get_file(f"{rel}/{name}", target)
    return local
