"""The contract between `Storage` and its backends: the interface and the small types it takes.

`components/storage/storage.py` picks a backend (`local.py`, `s3.py`) by its root; the backends
take these types and raise the errors of `components/storage/errors.py`. Both sides import
these two modules and they import neither, so a backend never reaches back into the class that
chose it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import fsspec


@dataclass(frozen=True)
class MultipartUpload:
    """An S3 multipart upload that was started and never completed or aborted."""

    rel: str  # its key relative to the storage root
    upload_id: str
    initiated: float  # seconds since the epoch


PartCheck = Callable[[int, str], None]  # (offset of a part, its sha256 hex); raises to abort


class Digest(Protocol):
    """What `get_file(..., digest=)` feeds: a hashlib-style object."""

    def update(self, data: bytes, /) -> None: ...


class Backend(Protocol):
    """What `Storage` calls on a backend; every `rel` is already checked by `check_rel`."""

    fs: fsspec.AbstractFileSystem

    def exists(self, rel: str) -> bool: ...
    def size(self, rel: str) -> int: ...
    def read_with_etag(self, rel: str) -> tuple[bytes, str]: ...
    def get_file(self, rel: str, local: Path, digest: Digest | None, part_sha256: PartCheck | None,
                 part_size: int) -> None: ...
    def ls(self, rel: str, recursive: bool) -> list[str]: ...
    def open_read(self, rel: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...
    def open_write(self, rel: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...
    def write_bytes(self, rel: str, data: bytes, create_only: bool) -> None: ...
    def put_file(self, local: Path, rel: str, create_only: bool) -> None: ...
    def write_if_match(self, rel: str, data: bytes, etag: str | None) -> str: ...
    def delete(self, rel: str, recursive: bool) -> None: ...
