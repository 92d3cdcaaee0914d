"""Curation: a LAION/img2dataset source -> curated manifest + rejections (DESIGN contract 2).

Two streaming passes, so metadata larger than memory works:

1. **Metadata** (`components/data/curate_filters.py`): vectorized filters over record batches of
   the metadata parquet(s); candidates are spilled to a local parquet, rejections kept.
2. **Images** (`components/data/source_shards.py`): candidates are matched to their tar shard,
   read as a stream once: image and `.txt` present, exact duplicates dropped.

Then the Great Expectations gate (`components/data/quality_gate.py`) validates the manifest, and
everything is written through `Storage`: `rejected.parquet`, `gx/` (data docs),
`summary.json`, `params.yaml`, and `manifest.parquet` last. The manifest's content hash
(sha256 of its bytes) versions it. The tables' schemas: `components/data/curate_schema.py`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.config import CurateConfig
from components.data.curate_filters import (
    BATCH_ROWS,
    Filters,
    filter_metadata,
    iter_metadata,
    metadata_files,
)
from components.data.curate_schema import CANDIDATE_SCHEMA, MANIFEST_SCHEMA, REJECTED_SCHEMA
from components.data.quality_gate import (
    GateLimits,
    ManifestGateFailed,
    failure_message,
    run_manifest_gate,
    shard_reads,
)
from components.data.source_shards import check_images
from components.progress import Progress, ProgressFn
from components.storage.atomic_dir import atomic_dir
from components.storage.content_hash import file_sha256
from components.storage.storage import Storage

# Most source rows end up here, so it is written for speed: keys are unique (a dictionary
# attempt is wasted work, half the write time), lz4 over zstd, no column statistics.
REJECTED_WRITE_OPTIONS: dict[str, Any] = {"compression": "lz4", "use_dictionary": ["reason", "detail"],
                                          "write_statistics": False}


class CurationEmpty(ValueError):
    """No row survived the filters."""


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
    into place when complete (`components/storage/atomic_dir.py`); S3: the folder after the previous run's
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
    rows done so far after each batch, noted "metadata" (total unknown, 0, until the pass ends
    with one report of all its rows) or "images" (of the candidates the metadata pass kept).
    Raises SourceError, CurationEmpty or ManifestGateFailed.
    """
    start = time.perf_counter()
    filters = Filters.from_config(cfg, min_side)
    done = {"metadata": 0, "images": 0}

    def report(phase: str, rows: int, total: int = 0) -> None:
        done[phase] += rows
        if progress is not None:
            progress(Progress(stage="curate", step=done[phase], total=total, note=phase))
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
        report("metadata", 0, total=done["metadata"])  # the pass is done: its total is known

        # 2. Images: presence, caption file, exact duplicates.
        manifest_w = pq.ParquetWriter(tmp_path / "manifest.parquet", MANIFEST_SCHEMA, compression="zstd")
        kept = 0

        def on_kept(b: pa.RecordBatch) -> None:
            nonlocal kept
            kept += b.num_rows
            manifest_w.write_batch(b)

        def candidate_batches() -> Iterator[pa.RecordBatch]:
            candidates = pq.ParquetFile(tmp_path / "candidates.parquet")
            for b in candidates.iter_batches(batch_size=BATCH_ROWS):
                yield b
                report("images", b.num_rows, total=candidates.metadata.num_rows)

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
