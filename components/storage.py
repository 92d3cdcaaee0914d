"""Storage: every artifact read and write, on a local path or an `s3://bucket/prefix` root.

All paths given to `Storage` methods are relative to its root, with `/` separators. Two
backends share one interface:

- **local**: a directory. Writes go to a temporary file in the target's directory, are
  fsynced, then `os.replace`d into place, so a reader sees the old file or the whole new
  one. Create-only writes publish the finished temporary file with `os.link`, which fails
  with EEXIST when the name exists: exactly one writer wins and nobody ever sees a partial
  file (a plain `O_EXCL` open would expose the file while it is being filled).
  Compare-and-swap takes an `fcntl` lock on a hidden lock file beside the target.
- **s3**: any S3-compatible endpoint (AWS, SeaweedFS, MinIO, R2). The endpoint comes from
  the constructor, else `$AWS_ENDPOINT_URL`; credentials from the standard AWS variables or
  profiles (never logged or stored). A write is one PUT (or a completed multipart upload
  for large non-conditional files), so an object appears whole or not at all. Create-only
  sends `If-None-Match: *`, compare-and-swap sends `If-Match: <etag>`. Object operations go
  through boto3 because they need those headers; `.fs` is an s3fs filesystem on the same
  endpoint for libraries that take fsspec (pyarrow, webdataset).

Connection failures are retried a bounded number of times (`retries`), then raise
`StorageUnavailable` naming the endpoint.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import fsspec

CHUNK = 8 * 1024 * 1024  # bytes per read when copying or hashing
PART_SIZE = 8 * 1024 * 1024  # bytes per ranged GET of a parallel S3 download
DOWNLOAD_THREADS = 10  # parallel ranged GETs per file (as `aws s3 cp`)
STREAM_CHUNK = 1024 * 1024  # bytes read from a response stream at a time
WINDOW = 16  # parts fetched ahead of an in-order digest (bounds memory to WINDOW * PART_SIZE)
SINGLE_PUT_LIMIT = 5 * 1024**3  # S3's largest single PUT; create-only uploads must fit in one
_HIDDEN_SUFFIXES = (".tmp", ".lock")  # our temp and lock files, never listed


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URL and what to do."""


class StorageUnavailable(StorageError):
    """The storage endpoint could not be reached after the configured retries."""


class AlreadyExists(StorageError, FileExistsError):
    """A create-only write found the object already there."""


class PreconditionFailed(StorageError):
    """A compare-and-swap write found a different version than the caller read."""


class NotFound(StorageError, FileNotFoundError):
    """The object does not exist."""


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
            self._backend: _Backend = _S3Backend(self, connect_timeout, read_timeout)
        else:
            self.endpoint_url = None
            self.region = None
            self.local_root = Path(os.path.expanduser(self.root)).absolute()
            self._backend = _LocalBackend(self.local_root)

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


# --- backends ------------------------------------------------------------------------------


class _Backend(Protocol):
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


def _is_hidden(name: str) -> bool:
    return name.startswith(".") and name.endswith(_HIDDEN_SUFFIXES)


class _LocalBackend:
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


class _S3Backend:
    """S3-compatible object store through boto3, conditional headers for create-only/CAS."""

    def __init__(self, store: Storage, connect_timeout: float, read_timeout: float):
        from botocore.config import Config

        self.store = store
        self.bucket = store.bucket
        self.endpoint = store.endpoint_url or "the default AWS endpoint"
        config = Config(
            # S3-compatible servers (SeaweedFS, MinIO, R2) reject the newer default checksums.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": store.retries, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=32,
            s3={"addressing_style": "path"},
        )
        self._client_config = config
        self._client_obj: Any = None
        self._client_pid: int | None = None
        self._fs: fsspec.AbstractFileSystem | None = None
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout

    @property
    def client(self) -> Any:
        """This process's boto3 client. A forked process (a DataLoader worker) gets its own:
        sharing the parent's pooled keep-alive sockets interleaves responses between processes
        and silently truncates streamed objects."""
        if self._client_obj is None or self._client_pid != os.getpid():
            import boto3

            self._client_obj = boto3.session.Session().client(
                "s3", endpoint_url=self.store.endpoint_url, region_name=self.store.region or "us-east-1",
                config=self._client_config)
            self._client_pid = os.getpid()
        return self._client_obj

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            client_kwargs: dict[str, Any] = {}
            if self.store.endpoint_url:
                client_kwargs["endpoint_url"] = self.store.endpoint_url
            if self.store.region:
                client_kwargs["region_name"] = self.store.region
            self._fs = fsspec.filesystem(
                "s3", client_kwargs=client_kwargs,
                config_kwargs={"request_checksum_calculation": "when_required",
                               "response_checksum_validation": "when_required",
                               "connect_timeout": self._connect_timeout, "read_timeout": self._read_timeout},
                skip_instance_cache=True)
            self._fs.retries = self.store.retries  # s3fs's own retry count (a class attribute)
        return self._fs

    # One place turns botocore errors into ours, naming the URL and never the credentials.
    @contextlib.contextmanager
    def _call(self, rel: str, what: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        url = f"s3://{self.bucket}/{self.store.key(rel)}"
        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                if code == "NoSuchBucket":
                    raise StorageError(f"{url}: bucket {self.bucket!r} does not exist at {self.endpoint}; "
                                       "create it or fix the storage root") from None
                raise NotFound(f"{url}: no such object") from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                raise PreconditionFailed(f"{url}: {what}: precondition failed ({code})") from None
            raise StorageError(f"{url}: {what} failed at {self.endpoint}: {code} {exc}") from None
        except NoCredentialsError:
            raise StorageError(f"{url}: {what}: no AWS credentials found; set AWS_ACCESS_KEY_ID/"
                               "AWS_SECRET_ACCESS_KEY or an AWS profile") from None
        except (BotoConnectionError, OSError) as exc:
            raise StorageUnavailable(
                f"{url}: {what}: S3 endpoint {self.endpoint} unreachable after {self.store.retries} attempts "
                f"({type(exc).__name__}); check storage.endpoint_url / AWS_ENDPOINT_URL and that the server "
                "is running") from None
        except BotoCoreError as exc:
            raise StorageError(f"{url}: {what} failed at {self.endpoint}: {exc}") from None

    def exists(self, rel: str) -> bool:
        try:
            with self._call(rel, "head"):
                self.client.head_object(Bucket=self.bucket, Key=self.store.key(rel))
        except NotFound:
            return False
        return True

    def size(self, rel: str) -> int:
        with self._call(rel, "head"):
            return int(self.client.head_object(Bucket=self.bucket, Key=self.store.key(rel))["ContentLength"])

    def read_with_etag(self, rel: str) -> tuple[bytes, str]:
        with self._call(rel, "get"):
            resp = self.client.get_object(Bucket=self.bucket, Key=self.store.key(rel))
            return resp["Body"].read(), resp["ETag"]

    def get_file(self, rel: str, local: Path, digest: Digest | None, part_sha256: PartCheck | None,
                 part_size: int) -> None:
        # Ranged GETs in parallel, each streamed in STREAM_CHUNK pieces that its thread writes
        # at their offset (and hashes, for `part_sha256`): no whole part is held in memory and
        # verification needs no second pass. Only a whole-file `digest` needs the parts in
        # order: then this thread feeds it, at most WINDOW parts behind. The object's ETag is
        # read before and after: a concurrent overwrite is an error, not a mix of two objects.
        # (Not `If-Match` on every part: SeaweedFS then serves ranges at half the speed.)
        key = self.store.key(rel)
        with self._call(rel, "head"):
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        size, etag = int(head["ContentLength"]), head["ETag"]

        def fetch(start: int, fd: int, keep: bool) -> bytes | None:
            end = min(start + part_size, size)
            extra = {"Range": f"bytes={start}-{end - 1}"} if size else {}
            part = hashlib.sha256() if part_sha256 is not None else None
            kept: list[bytes] = []
            offset = start
            with self._call(rel, "download"):
                body = self.client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"]
                for chunk in body.iter_chunks(STREAM_CHUNK):
                    if part is not None:
                        part.update(chunk)
                    os.pwrite(fd, chunk, offset)
                    offset += len(chunk)
                    if keep:
                        kept.append(chunk)
            if offset != end:
                raise StorageError(f"s3://{self.bucket}/{key}: bytes {start}-{end - 1}: got {offset - start} "
                                   f"bytes from {self.endpoint}; retry")
            if part is not None and part_sha256 is not None:
                part_sha256(start, part.hexdigest())
            return b"".join(kept) if keep else None

        starts = list(range(0, size, part_size)) or [0]
        keep = digest is not None
        with open(local, "wb") as fh:
            fd = fh.fileno()
            if len(starts) == 1:
                data = fetch(0, fd, keep)
                if digest is not None and data is not None:
                    digest.update(data)
            else:
                with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
                    self._run_parts(pool, [lambda s=s: fetch(s, fd, keep) for s in starts], digest)
        with self._call(rel, "head"):
            if self.client.head_object(Bucket=self.bucket, Key=key)["ETag"] != etag:
                raise StorageError(f"s3://{self.bucket}/{key}: changed while it was downloading; retry")

    @staticmethod
    def _run_parts(pool: ThreadPoolExecutor, jobs: list[Callable[[], bytes | None]],
                   digest: Digest | None) -> None:
        """Run part downloads; feed `digest` their bytes in order if given (WINDOW ahead)."""
        if digest is None:
            # Nothing needs the parts in order: every thread takes the next part when free.
            futures = [pool.submit(job) for job in jobs]
        else:
            futures = collections.deque(pool.submit(job) for job in jobs[:WINDOW])
        try:
            if digest is None:
                for future in futures:
                    future.result()
                return
            queued = iter(jobs[WINDOW:])
            while futures:
                data = futures.popleft().result()
                nxt = next(queued, None)
                if nxt is not None:
                    futures.append(pool.submit(nxt))
                digest.update(data or b"")
        finally:
            for future in futures:
                future.cancel()

    def ls(self, rel: str, recursive: bool) -> list[str]:
        prefix = self.store.key(rel)
        prefix = f"{prefix}/" if prefix else ""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if not recursive:
            kwargs["Delimiter"] = "/"
        out: list[str] = []
        with self._call(rel, "list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if name:
                        out.append(name)
                for cp in page.get("CommonPrefixes", []):
                    out.append(cp["Prefix"][len(prefix):].rstrip("/"))
        return out

    @contextlib.contextmanager
    def open_read(self, rel: str) -> Iterator[IO[bytes]]:
        with self._call(rel, "get"):
            body = self.client.get_object(Bucket=self.bucket, Key=self.store.key(rel))["Body"]
        try:
            yield body  # type: ignore[misc]
        finally:
            body.close()

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        # Spool locally, upload on success: the object appears whole, or not at all.
        import tempfile

        with tempfile.TemporaryFile() as fh:
            yield fh  # type: ignore[misc]
            fh.flush()
            fh.seek(0)
            with self._call(rel, "upload"):
                self.client.upload_fileobj(fh, self.bucket, self.store.key(rel))

    def _put(self, rel: str, body: Any, extra: dict[str, str], what: str) -> str:
        with self._call(rel, what):
            resp = self.client.put_object(Bucket=self.bucket, Key=self.store.key(rel), Body=body, **extra)
            return str(resp.get("ETag", ""))

    def write_bytes(self, rel: str, data: bytes, create_only: bool) -> None:
        try:
            self._put(rel, data, {"IfNoneMatch": "*"} if create_only else {}, "put")
        except PreconditionFailed:
            raise AlreadyExists(f"s3://{self.bucket}/{self.store.key(rel)}: already exists (create-only write)") from None

    def put_file(self, local: Path, rel: str, create_only: bool) -> None:
        if not create_only:
            with self._call(rel, "upload"):
                self.client.upload_file(str(local), self.bucket, self.store.key(rel))
            return
        size = local.stat().st_size
        if size > SINGLE_PUT_LIMIT:
            raise StorageError(f"{local}: {size} bytes is over the 5 GiB single-PUT limit of a create-only upload")
        try:
            with open(local, "rb") as fh:
                self._put(rel, fh, {"IfNoneMatch": "*"}, "put")
        except PreconditionFailed:
            raise AlreadyExists(f"s3://{self.bucket}/{self.store.key(rel)}: already exists (create-only write)") from None

    def write_if_match(self, rel: str, data: bytes, etag: str | None) -> str:
        extra = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            return self._put(rel, data, extra, "conditional put")
        except NotFound:
            # If-Match on a missing key answers 404 on some servers: the tag did not match.
            raise PreconditionFailed(f"s3://{self.bucket}/{self.store.key(rel)}: gone since it was read") from None

    def multipart_uploads(self, rel: str) -> list[MultipartUpload]:
        prefix = self.store.key(rel)
        prefix = f"{prefix}/" if prefix else ""
        root = f"{self.store.prefix}/" if self.store.prefix else ""
        out = []
        with self._call(rel, "list multipart uploads"):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                       Prefix=prefix):
                for up in page.get("Uploads", []):
                    out.append(MultipartUpload(up["Key"][len(root):], up["UploadId"], up["Initiated"].timestamp()))
        return out

    def abort_multipart_upload(self, upload: MultipartUpload) -> None:
        with self._call(upload.rel, "abort multipart upload"):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.store.key(upload.rel),
                                               UploadId=upload.upload_id)

    def delete(self, rel: str, recursive: bool) -> None:
        if not recursive:
            with self._call(rel, "delete"):
                self.client.delete_object(Bucket=self.bucket, Key=self.store.key(rel))
            return
        keys = [f"{self.store.key(rel)}/{name}".lstrip("/") for name in self.ls(rel, recursive=True)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            with self._call(rel, "delete"):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
