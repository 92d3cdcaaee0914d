"""Curation pass 1: a source's metadata parquet(s), read in record batches and tested against
the enabled filters at once (pyarrow compute, no per-row Python).

Each batch is split into candidates (CANDIDATE_SCHEMA, for pass 2 in
`components/data/source_shards.py`) and rejections (REJECTED_SCHEMA: key, reason, detail, value).
A row gets the first failing filter as its reason, in `METADATA_REASONS` order.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.config import CurateConfig
from components.data.curate_schema import CANDIDATE_SCHEMA, REJECTED_SCHEMA
from components.storage.read_ahead import read_ahead
from components.storage.storage import Storage

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

# Metadata filters, in the order that picks a row's reason.
METADATA_REASONS = ("missing_score", "low_aesthetic", "watermark", "unsafe", "undersized", "aspect_ratio",
                    "caption_length", "not_downloaded")
BATCH_ROWS = 1 << 17  # metadata rows per record batch
READ_AHEAD = 2  # metadata batches decoded ahead of the filters


class SourceError(ValueError):
    """The source is missing, unreadable or has the wrong columns or types."""


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

    def keep_passing(table: pa.RecordBatch, checks) -> pa.RecordBatch:
        """The rows of `table` every check passes; the others rejected with their first reason."""
        reason, value = checks(table, filters)
        keep = pc.is_null(reason)
        kept = table.filter(keep)
        if kept.num_rows < table.num_rows:
            drop = pc.invert(keep)
            reject(table.column("key").filter(drop), reason.filter(drop), value.filter(drop))
        return kept

    for batch in batches:
        rows += batch.num_rows
        survivors = keep_passing(batch, numeric_checks)  # 1. cheap numeric checks on every row
        if not survivors.num_rows:
            continue
        kept = keep_passing(survivors, string_checks)  # 2. string checks on the survivors only
        if kept.num_rows:
            on_candidates(_to_candidates(kept))
    return rows, {METADATA_REASONS[i]: c for i, c in enumerate(counts) if c}
