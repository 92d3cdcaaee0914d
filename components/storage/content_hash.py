"""Content fingerprints of stored trees and files, for cache keys and lineage.

A fingerprint changes exactly when the bytes change: a regenerated but identical source keeps
its fingerprint, a moved one too (names are relative to the tree). On S3 the object ETag
stands in for the content hash when the file is large, so a LAION-size source is not
downloaded just to decide whether to re-curate.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from components.storage.storage import Storage

HASH_BYTES_BELOW = 64 * 2**20  # hash content below this size; above it, use size + ETag on S3


def canonical_digest(value: Any) -> str:
    """sha256 of the canonical JSON of `value` (sorted keys): the digest of a config or key."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a local file, streamed (`hashlib.file_digest`)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _stored_file_digest(storage: Storage, rel: str) -> str:
    if storage.is_s3:
        info = storage.fs.info(storage.path(rel))
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        if etag and int(info.get("size", 0)) >= HASH_BYTES_BELOW:
            return f"etag:{etag}:{info.get('size')}"
    with storage.open(rel, "rb") as fh:  # a local file or an fsspec buffered file: both have readinto
        return hashlib.file_digest(fh, "sha256").hexdigest()


def tree_digest(storage: Storage, rel: str = "") -> str:
    """sha256 over every file below `rel`: its name relative to `rel` and its content digest.

    Raises FileNotFoundError naming the location when there is nothing there.
    """
    names = storage.ls(rel, recursive=True)  # relative to `rel`, sorted
    if not names:
        raise FileNotFoundError(f"{storage.url(rel)}: no files to fingerprint")
    prefix = f"{rel.rstrip('/')}/" if rel else ""
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\0{_stored_file_digest(storage, prefix + name)}\n".encode())
    return digest.hexdigest()
