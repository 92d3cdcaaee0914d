"""Curation pass 2: the source's tar shards, each read as a stream once, against the candidates.

A candidate is kept when its image and `.txt` are in its shard and (with dedup) its image
bytes were not seen before (sha256; only the seen-hash set grows with the data). A shard that
cannot be read to its end loses the rows after the break as `corrupt_shard` (garbage bytes,
with the byte offset) or `unreadable_shard` (truncated, missing, unopenable).
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from components.data.curate_schema import MANIFEST_SCHEMA, REJECTED_SCHEMA
from components.data.image_prep import IMAGE_EXTENSIONS
from components.storage.storage import Storage

log = logging.getLogger(__name__)

TAR_CACHE = 4  # tar member tables kept in memory (rows of one shard are contiguous)


@dataclass
class _ShardMembers:
    images: dict[str, tuple[str, str]]  # key -> (member name, sha256 of its bytes)
    texts: set[str]  # keys with a .txt member
    error: str | None  # why the shard could not be read to its end, if it could not
    reason: str = "unreadable_shard"  # with an error: corrupt_shard (garbage bytes) or unreadable_shard
    offset: int | None = None  # byte offset in the tar where reading stopped, when known


class _HeaderCheckedInfo(tarfile.TarInfo):
    """TarInfo that records a bad header before tarfile swallows it.

    In stream mode tarfile ends the member iteration silently at an invalid, empty or
    truncated header past the first block: a shard with garbage in its middle looked
    complete, and the members after the garbage looked missing (`missing_image`).
    """

    problem: tuple[int, tarfile.HeaderError] | None = None  # set on the per-read subclass

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        at = tar.fileobj.tell()
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # a zero block: the end-of-archive marker
        except tarfile.HeaderError as err:
            if cls.problem is None:
                cls.problem = (at, err)
            raise


def read_shard_members(source: Storage, shard: str) -> _ShardMembers:
    """Stream one tar: hash every image, note which keys have captions, keep any read error.

    A bad header (garbage bytes) is `corrupt_shard` at its byte offset; a tar that ends early
    (truncated, or no end-of-archive marker) or cannot be opened is `unreadable_shard`.
    """
    images: dict[str, tuple[str, str]] = {}
    texts: set[str] = set()
    where = source.url(shard)
    checked = type("_CheckedInfo", (_HeaderCheckedInfo,), {"problem": None})  # one record per read
    try:
        with source.open(shard) as fh, tarfile.open(fileobj=fh, mode="r|", tarinfo=checked) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                ext = ext.lower()
                if ext in IMAGE_EXTENSIONS:
                    data = tar.extractfile(member).read()
                    images[key] = (member.name, hashlib.sha256(data).hexdigest())
                elif ext == "txt":
                    texts.add(key)
    except FileNotFoundError:
        return _ShardMembers({}, set(), f"{where}: shard not found")
    except (tarfile.TarError, EOFError, OSError) as err:
        if checked.problem is None:
            return _ShardMembers(images, texts, f"{where}: truncated or corrupt tar ({type(err).__name__}: {err})")
    if checked.problem is not None:
        at, err = checked.problem
        if isinstance(err, tarfile.InvalidHeaderError | tarfile.SubsequentHeaderError):
            return _ShardMembers(images, texts, f"{where}: corrupt tar header at byte {at} ({err}); "
                                 f"the {len(images)} image(s) before it were read, the rest is lost",
                                 reason="corrupt_shard", offset=at)
        return _ShardMembers(images, texts, f"{where}: truncated tar, no end-of-archive marker at byte {at} "
                             f"({err})", offset=at)
    return _ShardMembers(images, texts, None)


UNREADABLE_REASONS = ("corrupt_shard", "unreadable_shard")  # rows lost with their shard, gated together


@dataclass
class ImageCheck:
    """What pass 2 found: rejections per reason, rows checked, and the shards that lost rows."""

    counts: dict[str, int] = field(default_factory=dict)
    checked: int = 0  # candidate rows that reached the shard read
    lost_shards: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard -> reason, offset, error, rows

    def lost_by_label(self) -> dict[str, int]:
        """`SHARD (reason at byte N)` -> rows lost: the values the gate's failure lists."""
        return {f"{shard} ({e['reason']}" + (f" at byte {e['offset']})" if e["offset"] is not None else ")"): e["rows"]
                for shard, e in self.lost_shards.items()}


def check_images(candidates: Iterator[pa.RecordBatch], source: Storage, dedup: bool,
                 on_kept: Callable[[pa.RecordBatch], None],
                 on_rejected: Callable[[pa.RecordBatch], None]) -> ImageCheck:
    """Pass 2: keep candidates whose image and caption are in their shard, drop duplicates."""
    cache: OrderedDict[str, _ShardMembers] = OrderedDict()
    seen: dict[str, str] = {}  # image sha256 -> first key
    result = ImageCheck()
    counts = result.counts

    def members_of(shard: str) -> _ShardMembers:
        if shard not in cache:
            cache[shard] = read_shard_members(source, shard)
            while len(cache) > TAR_CACHE:
                cache.popitem(last=False)
        cache.move_to_end(shard)
        return cache[shard]

    for batch in candidates:
        result.checked += batch.num_rows
        keep, members, hashes = [], [], []
        rej_keys, rej_reason, rej_detail = [], [], []
        for key, shard in zip(batch.column("key").to_pylist(), batch.column("shard").to_pylist(), strict=True):
            m = members_of(shard)
            reason = detail = None
            image = m.images.get(key)
            if (image is None or key not in m.texts) and m.error:  # lost with the rest of its shard
                reason, detail = m.reason, m.error
                lost = result.lost_shards.setdefault(shard, {"reason": m.reason, "offset": m.offset,
                                                             "error": m.error, "rows": 0})
                lost["rows"] += 1
            elif image is None:
                reason, detail = "missing_image", f"no {key}.jpg in {shard}"
            elif key not in m.texts:
                reason, detail = "missing_txt", f"no {key}.txt in {shard}"
            elif dedup and image[1] in seen:
                reason, detail = "duplicate", f"same image bytes as {seen[image[1]]}"
            if reason is None:
                if dedup:
                    seen[image[1]] = key
                keep.append(True)
                members.append(image[0])
                hashes.append(image[1])
            else:
                keep.append(False)
                rej_keys.append(key)
                rej_reason.append(reason)
                rej_detail.append(detail)
                counts[reason] = counts.get(reason, 0) + 1
        kept = batch.filter(pa.array(keep, pa.bool_()))
        if kept.num_rows:
            table = pa.Table.from_batches([kept]).append_column("member", pa.array(members, pa.string())) \
                .append_column("image_sha256", pa.array(hashes, pa.string()))
            for b in table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA).to_batches():
                on_kept(b)
        if rej_keys:
            on_rejected(pa.RecordBatch.from_arrays(
                [pa.array(rej_keys, pa.string()), pa.array(rej_reason, pa.string()).dictionary_encode(),
                 pa.array(rej_detail, pa.string()).dictionary_encode(), pa.nulls(len(rej_keys), pa.float64())],
                schema=REJECTED_SCHEMA))
    for shard, lost in result.lost_shards.items():
        log.warning("curate: %d row(s) lost to %s %s: %s", lost["rows"], lost["reason"], shard, lost["error"])
    return result
