"""The local-directory backend of `components/storage/storage.py`.

Writes go to a temporary file in the target's directory, are fsynced, then `os.replace`d into
place, so a reader sees the old file or the whole new one. Create-only writes publish the
finished temporary file with `os.link`, which fails with EEXIST when the name exists: exactly
one writer wins and nobody ever sees a partial file (a plain `O_EXCL` open would expose the
file while it is being filled). Compare-and-swap takes an `fcntl` lock on a hidden lock file
beside the target.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import fsspec

from components.storage.backend import Digest, PartCheck
from components.storage.errors import AlreadyExists, NotFound, PreconditionFailed, StorageError

CHUNK = 8 * 1024 * 1024  # bytes per read when copying a file in
_HIDDEN_SUFFIXES = (".tmp", ".lock")  # our temp and lock files, never listed


def _is_hidden(name: str) -> bool:
    return name.startswith(".") and name.endswith(_HIDDEN_SUFFIXES)


class LocalBackend:
    """Local directory: temp file + fsync + os.replace; create-only by os.link."""

    def __init__(self, root: Path):
        self.root = root
        self.fs = fsspec.filesystem("file")

    def _p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def _missing(self, rel: str) -> NotFound:
        return NotFound(f"{self._p(rel)}: no such file in storage")

    def exists(self, rel: str) -> bool:
        return self._p(rel).is_file()

    def size(self, rel: str) -> int:
        try:
            return self._p(rel).stat().st_size
        except FileNotFoundError:
            raise self._missing(rel) from None

    def read_with_etag(self, rel: str) -> tuple[bytes, str]:
        try:
            data = self._p(rel).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise self._missing(rel) from None
        return data, hashlib.sha256(data).hexdigest()

    def get_file(self, rel: str, local: Path, digest: Digest | None, part_sha256: PartCheck | None,
                 part_size: int) -> None:
        try:
            src = open(self._p(rel), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise self._missing(rel) from None
        with src, open(local, "wb") as dst:
            start = 0
            while chunk := src.read(part_size):
                if part_sha256 is not None:
                    part_sha256(start, hashlib.sha256(chunk).hexdigest())
                if digest is not None:
                    digest.update(chunk)
                dst.write(chunk)
                start += len(chunk)

    def ls(self, rel: str, recursive: bool) -> list[str]:
        base = self._p(rel)
        if not base.is_dir():
            return []
        if not recursive:
            return [p.name for p in base.iterdir() if not _is_hidden(p.name)]
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if not _is_hidden(f):
                    out.append(Path(dirpath, f).relative_to(base).as_posix())
        return out

    @contextlib.contextmanager
    def open_read(self, rel: str) -> Iterator[IO[bytes]]:
        try:
            fh = open(self._p(rel), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise self._missing(rel) from None
        with fh:
            yield fh

    @contextlib.contextmanager
    def _temp(self, rel: str) -> Iterator[tuple[IO[bytes], Path]]:
        """A hidden temp file beside `rel`; removed unless the caller renamed it away."""
        target = self._p(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "xb") as fh:
                yield fh, tmp
        finally:
            tmp.unlink(missing_ok=True)

    def _publish(self, tmp: Path, fh: IO[bytes], rel: str, create_only: bool) -> None:
        # 1. Data on disk before the name points at it, so a crash never leaves a torn file.
        fh.flush()
        os.fsync(fh.fileno())
        target = self._p(rel)
        # 2. Publish: link fails with EEXIST (create-only), replace is atomic (overwrite).
        if create_only:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise AlreadyExists(f"{target}: already exists (create-only write)") from None
        else:
            os.replace(tmp, target)
        # 3. Make the new directory entry durable too.
        with contextlib.suppress(OSError):
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        with self._temp(rel) as (fh, tmp):
            yield fh
            self._publish(tmp, fh, rel, create_only=False)

    def write_bytes(self, rel: str, data: bytes, create_only: bool) -> None:
        if create_only and self._p(rel).exists():
            raise AlreadyExists(f"{self._p(rel)}: already exists (create-only write)")
        with self._temp(rel) as (fh, tmp):
            fh.write(data)
            self._publish(tmp, fh, rel, create_only)

    def put_file(self, local: Path, rel: str, create_only: bool) -> None:
        if create_only and self._p(rel).exists():
            raise AlreadyExists(f"{self._p(rel)}: already exists (create-only write)")
        with self._temp(rel) as (fh, tmp), open(local, "rb") as src:
            shutil.copyfileobj(src, fh, CHUNK)
            self._publish(tmp, fh, rel, create_only)

    def write_if_match(self, rel: str, data: bytes, etag: str | None) -> str:
        target = self._p(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        lock_path = target.with_name(f".{target.name}.lock")
        # One writer at a time holds the lock; readers never need it (replace is atomic).
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = hashlib.sha256(target.read_bytes()).hexdigest() if target.exists() else None
                if current != etag:
                    raise PreconditionFailed(
                        f"{target}: changed since it was read (expected tag {etag}, found {current}); "
                        "read it again and retry")
                with self._temp(rel) as (fh, tmp):
                    fh.write(data)
                    self._publish(tmp, fh, rel, create_only=False)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return hashlib.sha256(data).hexdigest()

    def delete(self, rel: str, recursive: bool) -> None:
        p = self._p(rel)
        if p.is_dir():
            if not recursive:
                raise StorageError(f"{p}: is a folder; pass recursive=True to delete it")
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

