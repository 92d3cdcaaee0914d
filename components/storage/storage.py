"""Storage: every artifact read and write, on a local path or an `s3://bucket/prefix` root.

All paths given to `Storage` methods are relative to its root, with `/` separators. The root
picks one of two backends behind one interface (`Backend`, in
`components/storage/backend.py`; the errors both raise are in `errors.py`):

- **local** (`components/storage/local.py`): a directory; a write is a temp file, fsynced,
  then renamed into place (create-only: `os.link`, compare-and-swap: an `fcntl` lock).
- **s3** (`components/storage/s3.py`): any S3-compatible endpoint (AWS, SeaweedFS, MinIO, R2)
  through boto3; a write is one PUT, create-only and compare-and-swap are conditional PUTs.
  `.fs` is an s3fs filesystem on the same endpoint for libraries that take fsspec.

Connection failures are retried a bounded number of times (`retries`), then raise
`StorageUnavailable` naming the endpoint.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec

# The errors and types live beside the backends' contract, so local.py and s3.py need not
# import this module; the public ones are re-exported here, where every caller imports them.
from components.storage.backend import Backend, Digest, MultipartUpload, PartCheck
from components.storage.errors import (
    AlreadyExists,
    NotFound,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
)
from components.storage.local import LocalBackend
from components.storage.s3 import S3Backend

__all__ = [
    "PART_SIZE",
    "AlreadyExists",
    "Digest",
    "MultipartUpload",
    "NotFound",
    "PartCheck",
    "PreconditionFailed",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "check_rel",
]

PART_SIZE = 8 * 1024 * 1024  # bytes per ranged GET of a parallel S3 download (and per checked part)


def check_rel(rel: str) -> str:
    """Normalise a relative path; refuse absolute paths, `..` and empty segments."""
    rel = rel.replace("\\", "/").strip("/")
    parts = rel.split("/") if rel else []
    for part in parts:
        if part in ("", ".", ".."):
            raise StorageError(f"storage path {rel!r}: empty, '.' or '..' segment; paths are relative to the root")
    return "/".join(parts)


class Storage:
    """Atomic, create-only and compare-and-swap object storage under one root."""

    def __init__(self, root: str, endpoint_url: str | None = None, region: str | None = None,
                 retries: int = 3, connect_timeout: float = 5.0, read_timeout: float = 60.0):
        self.root = str(root)
        self.is_s3 = self.root.startswith("s3://")
        self.retries = max(1, int(retries))
        if self.is_s3:
            bucket_prefix = self.root[len("s3://"):].strip("/")
            if not bucket_prefix:
                raise StorageError(f"storage root {root!r}: expected s3://bucket[/prefix]")
            self.bucket, _, self.prefix = bucket_prefix.partition("/")
            self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
            self.region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None
            self._backend: Backend = S3Backend(self, connect_timeout, read_timeout)
        else:
            self.endpoint_url = None
            self.region = None
            self.local_root = Path(os.path.expanduser(self.root)).absolute()
            self._backend = LocalBackend(self.local_root)

    @classmethod
    def from_config(cls, cfg: Any) -> Storage:
        """From a `StorageConfig`-like section (root, endpoint_url, region, retries)."""
        return cls(cfg.root, endpoint_url=getattr(cfg, "endpoint_url", None), region=getattr(cfg, "region", None),
                   retries=getattr(cfg, "retries", 3))

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.is_s3 else ""
        return f"Storage({self.root!r}{where})"

    # --- addressing --------------------------------------------------------------------

    def child(self, rel: str) -> Storage:
        """A Storage rooted at `rel` below this one, on the same endpoint."""
        rel = check_rel(rel)
        root = f"{self.root.rstrip('/')}/{rel}" if rel else self.root
        return Storage(root, endpoint_url=self.endpoint_url, region=self.region, retries=self.retries)

    def url(self, rel: str = "") -> str:
        """Full URL (s3://...) or absolute local path of `rel`."""
        rel = check_rel(rel)
        if self.is_s3:
            return f"s3://{self.bucket}/{self.key(rel)}"
        return str(self.local_root / rel) if rel else str(self.local_root)

    def key(self, rel: str) -> str:
        """S3 object key of `rel` (bucket-relative)."""
        rel = check_rel(rel)
        return "/".join(p for p in (self.prefix, rel) if p)

    def path(self, rel: str = "") -> str:
        """Path of `rel` as `.fs` expects it (bucket/key on S3, absolute path locally)."""
        if self.is_s3:
            return f"{self.bucket}/{self.key(rel)}".rstrip("/")
        return self.url(rel)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """fsspec filesystem for libraries that take one (use with `.path(rel)`)."""
        return self._backend.fs

    # --- reads ---------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        """True when an object (S3) or file (local) exists at `rel`."""
        return self._backend.exists(check_rel(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self._backend.read_with_etag(check_rel(rel))[0]

    def read_with_etag(self, rel: str) -> tuple[bytes, str]:
        """Content and version tag of `rel`, for a later `write_if_match`."""
        return self._backend.read_with_etag(check_rel(rel))

    def size(self, rel: str) -> int:
        return self._backend.size(check_rel(rel))

    def get_file(self, rel: str, local: str | os.PathLike, *, digest: Digest | None = None,
                 part_sha256: PartCheck | None = None, part_size: int | None = None) -> None:
        """Download `rel` to a local file.

        `digest` gets every byte in order (one thread: a serial pass). `part_sha256(start,
        hexdigest)` gets the sha256 of each consecutive `part_size`-byte part (default
        PART_SIZE) as soon as that part is written, from several threads and in any order;
        it raises to abort the download.
        """
        self._backend.get_file(check_rel(rel), Path(local), digest, part_sha256, part_size or PART_SIZE)

    def ls(self, rel: str = "", *, recursive: bool = False) -> list[str]:
        """Sorted names directly below `rel` (files and folders), or all file paths below it
        relative to `rel` when recursive. Missing folders list as empty."""
        return sorted(self._backend.ls(check_rel(rel), recursive))

    @contextlib.contextmanager
    def open(self, rel: str, mode: str = "rb") -> Iterator[IO[bytes]]:
        """Read ("rb") or atomically write ("wb") a file: a "wb" file appears only when the
        block exits without an exception. An S3 "rb" stream is not seekable; libraries that
        seek take `.fs.open(.path(rel))`."""
        rel = check_rel(rel)
        if mode == "rb":
            with self._backend.open_read(rel) as fh:
                yield fh
        elif mode == "wb":
            with self._backend.open_write(rel) as fh:
                yield fh
        else:
            raise StorageError(f"Storage.open({rel!r}, {mode!r}): only 'rb' and 'wb' are supported")

    # --- writes --------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes, *, create_only: bool = False) -> None:
        """Write `data` atomically; with create_only, raise AlreadyExists if `rel` exists."""
        self._backend.write_bytes(check_rel(rel), bytes(data), create_only)

    def write_text(self, rel: str, text: str, *, create_only: bool = False) -> None:
        self.write_bytes(rel, text.encode(), create_only=create_only)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def put_file(self, local: str | os.PathLike, rel: str, *, create_only: bool = False) -> None:
        """Upload a local file atomically; with create_only, raise AlreadyExists if present."""
        local = Path(local)
        if not local.is_file():
            raise StorageError(f"put_file: {local} is not a file")
        self._backend.put_file(local, check_rel(rel), create_only)

    def write_if_match(self, rel: str, data: bytes, etag: str | None) -> str:
        """Compare-and-swap: replace `rel` only if its tag is still `etag` (None: only if it
        does not exist). Raises PreconditionFailed otherwise; returns the new tag."""
        return self._backend.write_if_match(check_rel(rel), bytes(data), etag)

    def delete(self, rel: str, *, recursive: bool = False) -> None:
        """Remove `rel` (a file; or everything below it when recursive). Missing is fine."""
        self._backend.delete(check_rel(rel), recursive)

    def multipart_uploads(self, rel: str = "") -> list[MultipartUpload]:
        """Incomplete S3 multipart uploads of keys below `rel` (a killed upload's parts, which
        cost storage and are invisible to `ls`); always empty on a local root."""
        if not self.is_s3:
            return []
        return self._backend.multipart_uploads(check_rel(rel))  # type: ignore[attr-defined]

    def abort_multipart_upload(self, upload: MultipartUpload) -> None:
        """Abort one incomplete multipart upload, freeing its parts."""
        if self.is_s3:
            self._backend.abort_multipart_upload(upload)  # type: ignore[attr-defined]

