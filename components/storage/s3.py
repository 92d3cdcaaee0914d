"""The S3 backend of `components/storage/storage.py`: any S3-compatible endpoint (AWS, SeaweedFS, MinIO, R2).

The endpoint comes from the `Storage` constructor, else `$AWS_ENDPOINT_URL`; credentials from
the standard AWS variables or profiles (never logged or stored). A write is one PUT (or a
completed multipart upload for large non-conditional files), so an object appears whole or not
at all. Create-only sends `If-None-Match: *`, compare-and-swap sends `If-Match: <etag>`. Object
operations go through boto3 because they need those headers; `.fs` is an s3fs filesystem on the
same endpoint for libraries that take fsspec (pyarrow, webdataset).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Protocol

import fsspec

from components.storage.backend import Digest, MultipartUpload, PartCheck
from components.storage.errors import (
    AlreadyExists,
    NotFound,
    PreconditionFailed,
    StorageError,
    StorageUnavailable,
)

DOWNLOAD_THREADS = 10  # parallel ranged GETs per file (as `aws s3 cp`)
STREAM_CHUNK = 1024 * 1024  # bytes read from a response stream at a time
WINDOW = 16  # parts fetched ahead of an in-order digest (bounds memory to WINDOW * PART_SIZE)
SINGLE_PUT_LIMIT = 5 * 1024**3  # S3's largest single PUT; create-only uploads must fit in one


class S3Root(Protocol):
    """What the backend reads from the `Storage` that chose it (named here, not imported, so
    this module never imports storage.py, which imports it)."""

    bucket: str
    prefix: str
    endpoint_url: str | None
    region: str | None
    retries: int

    def key(self, rel: str) -> str: ...


class S3Backend:
    """S3-compatible object store through boto3, conditional headers for create-only/CAS."""

    def __init__(self, store: S3Root, connect_timeout: float, read_timeout: float):
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
