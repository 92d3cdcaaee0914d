"""Verified pulls: fetch a version's files, check each against its manifest, keep verified
files in a content-addressed cache and write the pulled folder atomically.

    CACHE/sha256/AB/ABCDEF...   one read-only blob per verified file content

Large files are checked part by part by the download threads; small ones by one digest. A
cached blob is only a hint: it is re-hashed before use and dropped if it changed. A pulled
folder gets copies (reflinks where the filesystem has them), never hard links, so editing it
cannot change the cache. `Registry.pull` in `components/registry/registry.py` resolves the reference
and reads the manifest, then calls `pull_version`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from components.registry.manifest import MANIFEST, FileEntry, Manifest, RegistryError
from components.storage.content_hash import file_sha256
from components.storage.storage import PART_SIZE, NotFound, Storage

WORKERS = 4  # parallel file transfers per publish / pull
FICLONE = 0x40049409  # Linux ioctl: reflink one file's extents into another (btrfs, xfs, ...)

ProgressCallback = Callable[[str, int], None]  # (relative path, bytes) after each file


class VerificationError(RegistryError):
    """A pulled file does not match its manifest entry (tampered or truncated)."""


@dataclass(frozen=True)
class PullResult:
    manifest: Manifest
    path: Path
    downloaded: list[str] = field(default_factory=list)  # files fetched from the registry
    cached: list[str] = field(default_factory=list)  # files served from the local cache


def each(fn: Callable[[str], None], items: list[str]) -> None:
    """fn(item) for every item, WORKERS at a time; re-raises the first failure."""
    if len(items) < 2:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(fn, item) for item in items]
        errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]


def pull_version(storage: Storage, cache_dir: Path, manifest: Manifest, vdir: str, to: str | os.PathLike, *,
                 overwrite: bool = False, progress: ProgressCallback | None = None) -> PullResult:
    """Download, verify and write the files of `manifest` (stored under `vdir`) as folder `to`."""
    target = Path(to).absolute()
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise RegistryError(f"{target}: exists and is not empty; choose a new folder or pass overwrite")
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / f".staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        # 1. Serve what the cache has (re-hashed: the cache is only a hint), fetch the rest.
        cached = [rel for rel, e in manifest.files.items() if cache_valid(cache_dir, e)]
        missing = [rel for rel in manifest.files if rel not in cached]

        def fetch(rel: str) -> None:
            fetch_verified(storage, f"{vdir}/{rel}", manifest.files[rel], staging / manifest.files[rel].sha256, rel)
            if progress is not None:
                progress(rel, manifest.files[rel].size)

        each(fetch, missing)
        # 2. All verified: move into the cache, then assemble the folder beside the target.
        for rel in missing:
            entry = manifest.files[rel]
            blob = blob_path(cache_dir, entry.sha256)
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(staging / entry.sha256, 0o444)  # cache entries are never edited in place
            os.replace(staging / entry.sha256, blob)
        assemble(cache_dir, manifest, target, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PullResult(manifest=manifest, path=target, downloaded=sorted(missing), cached=sorted(cached))


def blob_path(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / "sha256" / sha256[:2] / sha256


def cache_valid(cache_dir: Path, entry: FileEntry) -> bool:
    """The cache holds `entry`'s content, re-verified now; a changed blob is dropped."""
    blob = blob_path(cache_dir, entry.sha256)
    try:
        if blob.stat().st_size != entry.size:
            return False
    except FileNotFoundError:
        return False
    if file_matches(blob, entry):
        return True
    blob.unlink(missing_ok=True)  # corrupted in place (e.g. a hardlinked copy was edited)
    return False


def file_matches(path: Path, entry: FileEntry) -> bool:
    """Re-verify a local file: its parts in parallel threads if listed, else one sha256 pass."""
    if not entry.parts:
        return file_sha256(path) == entry.sha256
    part_size = entry.part_size or PART_SIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        def part_ok(index: int) -> bool:
            data = os.pread(fd, part_size, index * part_size)
            return hashlib.sha256(data).hexdigest() == entry.parts[index]

        with ThreadPoolExecutor(WORKERS) as pool:
            return all(pool.map(part_ok, range(len(entry.parts))))
    finally:
        os.close(fd)


def fetch_verified(storage: Storage, key: str, entry: FileEntry, dest: Path, rel: str) -> None:
    """Download `key` to `dest`, checking it against `entry` as it arrives; raise
    VerificationError naming `rel` (and leave no `dest`) on any mismatch."""
    def mismatch(detail: str) -> VerificationError:
        return VerificationError(
            f"{rel}: does not match the manifest ({storage.url(key)}: {detail}); the stored "
            "version is tampered or truncated, nothing was written")

    def check_part(start: int, sha256: str) -> None:
        index = start // (entry.part_size or 1)
        if index >= len(entry.parts) or sha256 != entry.parts[index]:
            raise mismatch(f"part {index} at byte {start} has the wrong sha256 or lies past the "
                           f"{entry.size} bytes listed")

    # Large files: every part checked by its download thread; small ones: one digest.
    digest = None if entry.parts else hashlib.sha256()
    try:
        storage.get_file(key, dest, digest=digest, part_sha256=check_part if entry.parts else None,
                              part_size=entry.part_size)
    except NotFound:
        raise VerificationError(f"{rel}: listed in the manifest but missing from {storage.url(key)}") from None
    except VerificationError:
        dest.unlink(missing_ok=True)
        raise
    size = dest.stat().st_size
    if size != entry.size or (digest is not None and digest.hexdigest() != entry.sha256):
        dest.unlink(missing_ok=True)
        found = f"sha256 {digest.hexdigest()[:16]}..., " if digest is not None else ""
        raise mismatch(f"{size} bytes, {found}expected {entry.size} bytes, sha256 {entry.sha256[:16]}...")


def assemble(cache_dir: Path, manifest: Manifest, target: Path, overwrite: bool) -> None:
    """Write the pulled folder beside `target` from cached blobs, then move it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        tmp.mkdir()
        for rel, entry in manifest.files.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            copy_or_reflink(blob_path(cache_dir, entry.sha256), dest)
        (tmp / MANIFEST).write_bytes(manifest.raw or manifest.to_json().encode())
        if target.exists():
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
            elif overwrite:
                trash = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.old.tmp"
                os.replace(target, trash)
                os.replace(tmp, target)
                shutil.rmtree(trash, ignore_errors=True)
                return
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_or_reflink(src: Path, dest: Path) -> None:
    """Copy a cache blob into a pulled folder: a reflink (shared extents, copy-on-write) where
    the filesystem has them, else a full copy. Never a hard link: editing a pulled file must
    not change the cache or other pulled folders."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return
        except OSError:
            pass
    shutil.copyfile(src, dest)  # copy_file_range/sendfile where the kernel has them
