"""Curation: a LAION/img2dataset source -> curated manifest + rejections (DESIGN contract 2).

Two streaming passes, so metadata larger than memory works:

1. **Metadata** (vectorized, pyarrow): every metadata parquet is read in record batches;
   each batch is tested against the enabled filters at once and split into candidates
   (spilled to a local parquet) and rejections (key, reason, detail, value). A row gets the
   first failing filter as its reason, in `METADATA_REASONS` order.
2. **Images**: candidates are matched to their tar shard, read as a stream once: an image
   must be present with its `.txt`, and exact duplicates (sha256 of the image bytes) are
   dropped, keeping the first. Only the seen-hash set grows with the data.

Then the Great Expectations gate (`components/quality_gate.py`) validates the manifest, and
everything is written through `Storage`: `rejected.parquet`, `gx/` (data docs),
`summary.json`, `params.yaml`, and `manifest.parquet` last. The manifest's content hash
(sha256 of its bytes) versions it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import shutil
import tarfile
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.atomic_dir import atomic_dir
from components.config import CurateConfig
from components.content_hash import file_sha256
from components.progress import Progress, ProgressFn
from components.quality_gate import (
    GateLimits,
    ManifestGateFailed,
    failure_message,
    run_manifest_gate,
    shard_reads,
)
from components.read_ahead import read_ahead
from components.storage import Storage

log = logging.getLogger(__name__)

# Manifest column -> source column names accepted for it (LAION first, img2dataset second).
SOURCE_COLUMNS: dict[str, tuple[str, ...]] = {
    "key": ("key",),
    "caption": ("TEXT", "caption"),
    "width": ("WIDTH", "width", "original_width"),
    "height": ("HEIGHT", "height", "original_height"),
    "aesthetic": ("AESTHETIC_SCORE", "aesthetic"),
    "pwatermark": ("pwatermark",),
    "punsafe": ("punsafe",),
    "similarity": ("similarity",),
    "shard": ("shard",),
    "status": ("status",),
}
NUMERIC = {"width", "height", "aesthetic", "pwatermark", "punsafe", "similarity"}

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("shard", pa.string()),  # source tar, relative to the source root
    ("member", pa.string()),  # image member inside the tar (KEY.jpg)
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("aesthetic", pa.float64()),
    ("pwatermark", pa.float64()),
    ("punsafe", pa.float64()),
    ("similarity", pa.float64()),
    ("image_sha256", pa.string()),
])
CANDIDATE_SCHEMA = pa.schema([f for f in MANIFEST_SCHEMA if f.name not in ("member", "image_sha256")])
REJECTED_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("reason", pa.dictionary(pa.int32(), pa.string())),
    ("detail", pa.dictionary(pa.int32(), pa.string())),  # the threshold or error that rejected it
    ("value", pa.float64()),  # the offending value, where there is one
])

# Most source rows end up here, so it is written for speed: keys are unique (a dictionary
# attempt is wasted work, half the write time), lz4 over zstd, no column statistics.
REJECTED_WRITE_OPTIONS: dict[str, Any] = {"compression": "lz4", "use_dictionary": ["reason", "detail"],
                                          "write_statistics": False}

# Metadata filters, in the order that picks a row's reason.
METADATA_REASONS = ("missing_score", "low_aesthetic", "watermark", "unsafe", "undersized", "aspect_ratio",
                    "caption_length", "not_downloaded")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BATCH_ROWS = 1 << 17  # metadata rows per record batch
READ_AHEAD = 2  # metadata batches decoded ahead of the filters
TAR_CACHE = 4  # tar member tables kept in memory (rows of one shard are contiguous)


class SourceError(ValueError):
    """The source is missing, unreadable or has the wrong columns or types."""


class CurationEmpty(ValueError):
    """No row survived the filters."""


@dataclass(frozen=True)
class Filters:
    """The enabled metadata filters; None disables one."""

    min_aesthetic: float | None = 6.0
    max_watermark: float | None = 0.5
    max_unsafe: float | None = 0.5
    min_side: int | None = None
    max_aspect: float | None = 2.0
    caption_min_chars: int = 1
    caption_max_chars: int = 500

    @classmethod
    def from_config(cls, cfg: CurateConfig, min_side: int | None) -> Filters:
        return cls(cfg.min_aesthetic, cfg.max_watermark, cfg.max_unsafe,
                   cfg.min_side if cfg.min_side is not None else min_side, cfg.max_aspect,
                   cfg.caption_min_chars, cfg.caption_max_chars)

    def describe(self) -> dict[str, str]:
        """Reason -> the rule that rejects, as stored in `detail`."""
        return {
            "not_downloaded": "status is not 'success'",
            "missing_score": "a score an enabled filter needs is NaN or null",
            "low_aesthetic": f"AESTHETIC_SCORE < {self.min_aesthetic} (curate.min_aesthetic)",
            "watermark": f"pwatermark > {self.max_watermark} (curate.max_watermark)",
            "unsafe": f"punsafe > {self.max_unsafe} (curate.max_unsafe)",
            "undersized": f"shorter side < {self.min_side} px (curate.min_side)",
            "aspect_ratio": f"long/short side > {self.max_aspect} (curate.max_aspect)",
            "caption_length": (f"caption length outside [{self.caption_min_chars}, {self.caption_max_chars}] "
                               "chars (curate.caption_min_chars/caption_max_chars)"),
        }


@dataclass
class CurationResult:
    rows_in: int
    kept: int
    rejected: dict[str, int]  # reason -> count
    manifest_hash: str
    elapsed_s: float
    files: list[str] = field(default_factory=list)  # written, relative to the storage root

    def as_dict(self) -> dict[str, Any]:
        return {"rows_in": self.rows_in, "kept": self.kept, "rejected": self.rejected,
                "manifest_hash": self.manifest_hash, "elapsed_s": round(self.elapsed_s, 3)}


# --- source reading ---------------------------------------------------------------------


def _resolve_columns(names: list[str], mapping: dict[str, str], where: str) -> dict[str, str]:
    """Manifest column -> source column, after applying `curate.columns` renames."""
    renamed = {mapping.get(n, n): n for n in names}  # LAION name -> physical name
    out = {}
    for canon, aliases in SOURCE_COLUMNS.items():
        for alias in aliases:
            if alias in renamed:
                out[canon] = renamed[alias]
                break
    return out


def _check_types(schema: pa.Schema, cols: dict[str, str], where: str) -> None:
    problems = []
    for canon, physical in cols.items():
        typ = schema.field(physical).type
        if canon in NUMERIC and not (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
            problems.append(f"column {physical} has type {typ}, expected a number")
        if canon not in NUMERIC and not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            problems.append(f"column {physical} has type {typ}, expected a string")
    if problems:
        raise SourceError(f"{where}: " + "; ".join(problems)
                          + ". Fix the source, or map the right columns with curate.columns (source -> LAION name)")


def _required(filters: Filters) -> list[str]:
    need = ["key", "caption", "width", "height"]
    need += [c for c, on in (("aesthetic", filters.min_aesthetic), ("pwatermark", filters.max_watermark),
                             ("punsafe", filters.max_unsafe)) if on is not None]
    return need


def metadata_files(source: Storage, pattern: str) -> list[str]:
    """The metadata parquet files of a source (names relative to its root)."""
    names = [n for n in source.ls("", recursive=True) if fnmatch.fnmatch(n, pattern)]
    if not names:
        raise SourceError(f"{source.url()}: no metadata matching {pattern!r} (curate.metadata); "
                          "run `lcmlora toy source` or point curate.source at a LAION/img2dataset folder")
    return names


def iter_metadata(source: Storage, files: list[str], filters: Filters, mapping: dict[str, str],
                  batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches renamed to manifest column names, in the source's own types, one file at
    a time; `shard` (when the source has none: the file's stem + .tar) is dictionary-encoded."""
    for name in files:
        where = source.url(name)
        try:
            with source.fs.open(source.path(name), "rb") as fh:
                schema = pq.read_schema(fh)
        except (OSError, pa.ArrowInvalid) as err:
            raise SourceError(f"{where}: unreadable parquet: {err}") from None
        cols = _resolve_columns(schema.names, mapping, where)
        missing = [c for c in _required(filters) if c not in cols]
        if missing:
            wanted = ", ".join(f"{c} (one of {'/'.join(SOURCE_COLUMNS[c])})" for c in missing)
            raise SourceError(f"{where}: missing column(s) {wanted}; has {schema.names}. "
                              "Map source columns to LAION names with curate.columns")
        _check_types(schema, cols, where)
        shard_default = pa.array([Path(name).stem + ".tar"], pa.string())
        physical = list(dict.fromkeys(cols.values()))
        with source.fs.open(source.path(name), "rb") as fh:
            # Low-cardinality strings stay dictionary-encoded: no per-row string decoding.
            # pre_buffer stays off: it keeps the whole file's column chunks, so memory would grow
            # with the file; reading ahead one batch in a thread (below) overlaps I/O instead.
            parquet = pq.ParquetFile(fh, pre_buffer=False,
                                     read_dictionary=[cols[c] for c in ("shard", "status") if c in cols])
            batches = parquet.iter_batches(batch_size=batch_rows, columns=physical, use_threads=True)
            for batch in read_ahead(batches, READ_AHEAD, "lcmlora-curate-reader"):
                arrays = {canon: batch.column(physical.index(col)) for canon, col in cols.items()}
                if "shard" not in arrays:
                    arrays["shard"] = pa.DictionaryArray.from_arrays(pa.array(np.zeros(batch.num_rows, np.int32)),
                                                                     shard_default)
                yield pa.RecordBatch.from_arrays(list(arrays.values()), names=list(arrays))


def _to_candidates(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Kept rows in CANDIDATE_SCHEMA (cast only the few survivors, not every source row)."""
    arrays = []
    for f in CANDIDATE_SCHEMA:
        if f.name in batch.schema.names:
            arr = batch.column(f.name)
            arrays.append(arr if arr.type == f.type else pc.cast(arr, f.type, safe=False))
        else:
            arrays.append(pa.nulls(batch.num_rows, f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=CANDIDATE_SCHEMA)


# --- pass 1: vectorized metadata filters ------------------------------------------------


def _nan_or_null(arr: pa.Array) -> pa.Array:
    return pc.fill_null(pc.is_nan(arr), True)


def _first_failure(fails: list[pa.Array], values: list[pa.Array], offset: int) -> tuple[pa.Array, pa.Array]:
    """Per row: index (offset + i) of the first failing check, null if none; and its value."""
    cond = pa.StructArray.from_arrays(fails, names=[str(i) for i in range(len(fails))])
    reason = pc.case_when(cond, *[pa.scalar(offset + i, pa.int8()) for i in range(len(fails))])
    value = pc.case_when(cond, *[pc.cast(v, pa.float64()) for v in values])
    return reason, value


def numeric_checks(batch: pa.RecordBatch, filters: Filters) -> tuple[pa.Array, pa.Array]:
    """Scores and geometry over a whole batch: (reason index or null, offending value).

    Null handling is explicit: a null/NaN score an enabled filter needs is `missing_score`,
    a null size is `undersized`.
    """
    n = batch.num_rows
    false = pa.array(np.zeros(n, dtype=bool))
    none = pa.nulls(n, pa.float64())
    fails: list[pa.Array] = []
    values: list[pa.Array] = []
    # 1. Scores: missing first, then each threshold.
    missing = false
    for column, threshold in (("aesthetic", filters.min_aesthetic), ("pwatermark", filters.max_watermark),
                              ("punsafe", filters.max_unsafe)):
        if threshold is not None:
            missing = pc.or_(missing, _nan_or_null(batch.column(column)))
    fails.append(missing)
    values.append(none)
    for column, threshold, op in (("aesthetic", filters.min_aesthetic, pc.less),
                                  ("pwatermark", filters.max_watermark, pc.greater),
                                  ("punsafe", filters.max_unsafe, pc.greater)):
        fails.append(false if threshold is None else pc.fill_null(op(batch.column(column), threshold), False))
        values.append(none if threshold is None else batch.column(column))
    # 2. Geometry.
    width, height = batch.column("width"), batch.column("height")
    short, long = pc.min_element_wise(width, height), pc.max_element_wise(width, height)
    fails.append(false if filters.min_side is None else pc.fill_null(pc.less(short, filters.min_side), True))
    values.append(short)
    aspect = pc.divide(pc.cast(long, pa.float64()), pc.cast(short, pa.float64()))
    fails.append(false if filters.max_aspect is None else pc.fill_null(pc.greater(aspect, filters.max_aspect), True))
    values.append(aspect)
    return _first_failure(fails, values, offset=0)


def string_checks(batch: pa.RecordBatch, filters: Filters) -> tuple[pa.Array, pa.Array]:
    """Caption length (whitespace trimmed; null = 0) and img2dataset status, run only on the
    rows the numeric checks kept: string kernels are the costly ones."""
    n = batch.num_rows
    length = pc.fill_null(pc.utf8_length(pc.utf8_trim_whitespace(batch.column("caption"))), 0)
    fails = [pc.or_(pc.less(length, filters.caption_min_chars), pc.greater(length, filters.caption_max_chars))]
    values = [length]
    if "status" in batch.schema.names:
        fails.append(pc.fill_null(pc.not_equal(batch.column("status"), "success"), True))
    else:
        fails.append(pa.array(np.zeros(n, dtype=bool)))
    values.append(pa.nulls(n, pa.float64()))
    return _first_failure(fails, values, offset=METADATA_REASONS.index("caption_length"))


def _rejected_batch(keys: pa.Array, reason_idx: pa.Array, value: pa.Array, filters: Filters) -> pa.RecordBatch:
    """Rejection rows from reason indices; reason and detail share one small dictionary each."""
    details = filters.describe()
    idx = pc.cast(reason_idx, pa.int32())
    reasons = pa.DictionaryArray.from_arrays(idx, pa.array(METADATA_REASONS, pa.string()))
    detail = pa.DictionaryArray.from_arrays(idx, pa.array([details[r] for r in METADATA_REASONS], pa.string()))
    return pa.RecordBatch.from_arrays([pc.cast(keys, pa.string()), reasons, detail, value], schema=REJECTED_SCHEMA)


def filter_metadata(batches: Iterator[pa.RecordBatch], filters: Filters,
                    on_candidates: Callable[[pa.RecordBatch], None],
                    on_rejected: Callable[[pa.RecordBatch], None]) -> tuple[int, dict[str, int]]:
    """Pass 1 over any stream of metadata batches; returns (rows seen, rejections per reason).

    A row's reason is its first failing check in METADATA_REASONS order. Candidates go to
    `on_candidates` in CANDIDATE_SCHEMA, rejections to `on_rejected` in REJECTED_SCHEMA.
    """
    rows = 0
    counts = [0] * len(METADATA_REASONS)

    def reject(keys: pa.Array, reason: pa.Array, value: pa.Array) -> None:
        for entry in pc.value_counts(reason).to_pylist():
            counts[entry["values"]] += entry["counts"]
        on_rejected(_rejected_batch(keys, reason, value, filters))

    for batch in batches:
        rows += batch.num_rows
        # 1. Cheap numeric checks on every row.
        reason, value = numeric_checks(batch, filters)
        alive = pc.is_null(reason)
        survivors = batch.filter(alive)
        if survivors.num_rows < batch.num_rows:
            drop = pc.invert(alive)
            reject(batch.column("key").filter(drop), reason.filter(drop), value.filter(drop))
        if not survivors.num_rows:
            continue
        # 2. String checks on the survivors only.
        reason, value = string_checks(survivors, filters)
        keep = pc.is_null(reason)
        kept = survivors.filter(keep)
        if kept.num_rows < survivors.num_rows:
            drop = pc.invert(keep)
            reject(survivors.column("key").filter(drop), reason.filter(drop), value.filter(drop))
        if kept.num_rows:
            on_candidates(_to_candidates(kept))
    return rows, {METADATA_REASONS[i]: c for i, c in enumerate(counts) if c}


# --- pass 2: images in the tar shards ---------------------------------------------------


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


# --- the whole stage ---------------------------------------------------------------------


def _empty_message(source: str, rows: int, counts: dict[str, int], filters: Filters) -> str:
    rules = filters.describe()
    listed = "; ".join(f"{r}: {c} rows ({rules.get(r, 'image check')})" for r, c in
                       sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"{source}: no rows left after filtering {rows} rows. Rejected by {listed}. "
            "Relax the filters in params.yaml (curate.*) or check the source")


# Everything a curation writes into its folder; the manifest first, so it is gone before the rest.
OUTPUT_FILES = ("manifest.parquet", "summary.json", "rejected.parquet", "params.yaml", "gx")


@contextlib.contextmanager
def _output_folder(storage: Storage, out_rel: str) -> Iterator[tuple[Storage, Callable[[str], str]]]:
    """Where a run writes (a Storage and name -> its path there). Local: a staging folder renamed
    into place when complete (`components/atomic_dir.py`); S3: the folder after the previous run's
    files are deleted (the manifest first)."""
    folder = out_rel.strip("/")
    if storage.is_s3:
        for name in OUTPUT_FILES:
            storage.delete(f"{folder}/{name}" if folder else name, recursive=name == "gx")
        yield storage, lambda name: f"{folder}/{name}" if folder else name
        return
    with atomic_dir(storage.url(folder), owns=OUTPUT_FILES) as staging:
        yield Storage(str(staging)), lambda name: name


def curate(source: Storage, storage: Storage, out_rel: str, cfg: CurateConfig, *, min_side: int | None,
           resolved_config: str | None = None, progress: ProgressFn | None = None) -> CurationResult:
    """Run curation end to end; write the manifest folder `out_rel` under `storage`.

    `min_side` is the base resolution, used when `cfg.min_side` is None. `progress` gets the
    rows done so far after each batch (total unknown: 0), noted "metadata" or "images".
    Raises SourceError, CurationEmpty or ManifestGateFailed.
    """
    start = time.perf_counter()
    filters = Filters.from_config(cfg, min_side)
    done = {"metadata": 0, "images": 0}

    def report(phase: str, rows: int) -> None:
        done[phase] += rows
        if progress is not None:
            progress(Progress(stage="curate", step=done[phase], total=0, note=phase))
    out = lambda name: f"{out_rel.strip('/')}/{name}" if out_rel.strip("/") else name

    with tempfile.TemporaryDirectory(prefix="lcmlora-curate-") as tmp:
        tmp_path = Path(tmp)
        rejected_w = pq.ParquetWriter(tmp_path / "rejected.parquet", REJECTED_SCHEMA, **REJECTED_WRITE_OPTIONS)
        candidates_w = pq.ParquetWriter(tmp_path / "candidates.parquet", CANDIDATE_SCHEMA, compression="zstd")

        # 1. Metadata filters, streaming.
        files = metadata_files(source, cfg.metadata)

        def batches() -> Iterator[pa.RecordBatch]:
            for b in iter_metadata(source, files, filters, cfg.columns):
                report("metadata", b.num_rows)
                yield b

        rows_in, counts = filter_metadata(batches(), filters, candidates_w.write_batch, rejected_w.write_batch)
        candidates_w.close()

        # 2. Images: presence, caption file, exact duplicates.
        manifest_w = pq.ParquetWriter(tmp_path / "manifest.parquet", MANIFEST_SCHEMA, compression="zstd")
        kept = 0

        def on_kept(b: pa.RecordBatch) -> None:
            nonlocal kept
            kept += b.num_rows
            manifest_w.write_batch(b)

        def candidate_batches() -> Iterator[pa.RecordBatch]:
            for b in pq.ParquetFile(tmp_path / "candidates.parquet").iter_batches(batch_size=BATCH_ROWS):
                yield b
                report("images", b.num_rows)

        images = check_images(candidate_batches(), source, cfg.dedup, on_kept, rejected_w.write_batch)
        manifest_w.close()
        rejected_w.close()
        for reason, c in images.counts.items():
            counts[reason] = counts.get(reason, 0) + c

        summary: dict[str, Any] = {"source": source.url(), "rows_in": rows_in, "kept": kept,
                                   "rejected": dict(sorted(counts.items())), "filters": filters.describe(),
                                   "manifest_hash": None, "unreadable_shards": images.lost_shards}
        files_written: list[str] = []
        failure: Exception | None = None
        # 3. This run's files replace the previous run's whole (`_output_folder`), so a failed or
        #    empty curation leaves its own summary and rejections, never another run's beside no manifest.
        with _output_folder(storage, out_rel) as (dest, into):
            def publish(local: Path, name: str) -> None:
                dest.put_file(local, into(name))
                files_written.append(out(name))

            publish(tmp_path / "rejected.parquet", "rejected.parquet")
            if resolved_config is not None:
                (tmp_path / "params.yaml").write_text(resolved_config)
                publish(tmp_path / "params.yaml", "params.yaml")
            # 4. Fail closed: nothing kept, or the GX suite fails.
            if kept == 0:
                failure = CurationEmpty(_empty_message(source.url(), rows_in, counts, filters))
            else:
                manifest = pq.read_table(tmp_path / "manifest.parquet")
                limits = GateLimits(columns=tuple(MANIFEST_SCHEMA.names), min_rows=cfg.min_rows,
                                    min_aesthetic=filters.min_aesthetic, max_watermark=filters.max_watermark,
                                    max_unsafe=filters.max_unsafe, min_side=filters.min_side,
                                    caption_min_chars=filters.caption_min_chars,
                                    caption_max_chars=filters.caption_max_chars,
                                    unique_images=cfg.dedup, max_null_rate=cfg.max_null_rate,
                                    max_unreadable_rate=cfg.max_unreadable_rate)
                gate = run_manifest_gate(manifest, limits, tmp_path / "gx-context",
                                         reads=shard_reads(images.checked, images.lost_by_label()))
                del manifest
                for page in sorted(p for p in gate.docs_dir.rglob("*") if p.is_file()):
                    publish(page, f"gx/{page.relative_to(gate.docs_dir).as_posix()}")
                summary["gate"] = {"success": gate.success, "data_docs": out("gx/index.html"),
                                   "statistics": gate.description.get("statistics")}
                if not gate.success:
                    failure = ManifestGateFailed(failure_message(gate.description, storage.url(out("gx/index.html"))))
            # 5. Publish: summary, then the manifest last (its presence means a complete, gated run).
            if failure is None:
                summary["manifest_hash"] = manifest_hash = file_sha256(tmp_path / "manifest.parquet")
                summary["elapsed_s"] = round(time.perf_counter() - start, 3)
            dest.write_text(into("summary.json"), json.dumps(summary, indent=1, sort_keys=True) + "\n")
            files_written.append(out("summary.json"))
            if failure is None:
                publish(tmp_path / "manifest.parquet", "manifest.parquet")
        shutil.rmtree(tmp_path / "gx-context", ignore_errors=True)
    if failure is not None:
        raise failure
    return CurationResult(rows_in=rows_in, kept=kept, rejected=dict(sorted(counts.items())),
                          manifest_hash=manifest_hash, elapsed_s=time.perf_counter() - start, files=files_written)
