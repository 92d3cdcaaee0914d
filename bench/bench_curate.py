"""Metadata filtering throughput and peak memory on a generated LAION-style parquet.

    .venv/bin/python bench/bench_curate.py --rows 10000000            # goal: >= 5M rows/s
    .venv/bin/python bench/bench_curate.py --rows 1000000 --rows 10000000   # memory vs row count

Generates (once, cached under --workdir) a LAION-style metadata parquet with the LAION column
names and realistic distributions (AESTHETIC_SCORE ~ N(5.0, 0.7), pwatermark/punsafe skewed
low, sizes 128-2048 px, captions of varied length, a few NaN scores and empty captions), then
runs curation's pass 1 exactly as `lcmlora curate` does (`iter_metadata` -> `filter_metadata`,
candidates and rejections streamed to parquet) in a fresh subprocess per size, reporting
rows/s and the process's peak RSS. Image checks (pass 2) read tars and are not part of it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHUNK = 1_000_000  # rows generated (and written as one row group) at a time
WORDS = ["a", "photo", "of", "the", "red", "old", "small", "city", "car", "dog", "cat", "on", "in", "at", "with", "blue", "sunset", "beach", "mountain", "house", "portrait", "painting", "digital", "art", "landscape", "woman", "man", "street", "night", "vintage", "poster", "logo", "abstract"]


def _captions(rng: np.random.Generator, n: int) -> pa.Array:
    """Captions of 1-16 words, practically unique per row (three phrase pools joined), so the
    parquet cannot dictionary-encode them away; a few empty or blank ones."""
    pools = []
    for _ in range(3):
        pool = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 6)))) for _ in range(1000)]
        pools.append(pa.array(pool).take(pa.array(rng.integers(0, len(pool), n))))
    captions = pc.binary_join_element_wise(*pools, " ")
    blank = pa.array(rng.random(n) < 0.0005)
    return pc.if_else(blank, pa.scalar("  "), captions)


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    schema = None
    writer = None
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        ids = pa.array(np.arange(start, start + n))
        key = pc.utf8_lpad(pc.cast(ids, pa.string()), width=9, padding="0")
        aesthetic = rng.normal(5.0, 0.7, n)
        aesthetic[rng.random(n) < 0.001] = np.nan
        table = pa.table({
            "key": key,
            "shard": pc.binary_join_element_wise(pc.utf8_lpad(pc.cast(pc.divide(ids, 10_000), pa.string()), width=5,
                                                              padding="0"), ".tar", ""),
            "URL": pc.binary_join_element_wise("https://images.example.com/i/", key, ".jpg", ""),
            "TEXT": _captions(rng, n),
            "WIDTH": pa.array(rng.integers(128, 2048, n)),
            "HEIGHT": pa.array(rng.integers(128, 2048, n)),
            "similarity": pa.array(rng.uniform(0.28, 0.45, n)),
            "punsafe": pa.array(rng.beta(0.5, 8.0, n)),
            "pwatermark": pa.array(rng.beta(0.6, 3.0, n)),
            "AESTHETIC_SCORE": pa.array(aesthetic),
        })
        if writer is None:
            schema = table.schema
            writer = pq.ParquetWriter(path, schema, compression="snappy")
        writer.write_table(table, row_group_size=CHUNK)
    writer.close()


def run_filter(path: Path, batch_rows: int | None = None) -> dict:
    """Pass 1 of curation over `path`, as the stage runs it; returns rows/s and peak RSS."""
    # Arrow sizes its thread pool by the host's CPUs, not the process's affinity: under
    # `taskset -c 0,1` on a big host it would run 16 threads on 2 cores. Size it as a 2-core
    # machine would.
    cores = len(os.sched_getaffinity(0))
    pa.set_cpu_count(cores)
    pa.set_io_thread_count(cores)
    from components.config import CurateConfig
    from components.data.curate import REJECTED_WRITE_OPTIONS
    from components.data.curate_filters import BATCH_ROWS, Filters, filter_metadata, iter_metadata
    from components.data.curate_schema import CANDIDATE_SCHEMA, REJECTED_SCHEMA
    from components.storage.storage import Storage

    filters = Filters.from_config(CurateConfig(), min_side=512)
    source = Storage(str(path.parent))
    with tempfile.TemporaryDirectory() as tmp:
        cand = pq.ParquetWriter(Path(tmp) / "candidates.parquet", CANDIDATE_SCHEMA, compression="zstd")
        rej = pq.ParquetWriter(Path(tmp) / "rejected.parquet", REJECTED_SCHEMA, **REJECTED_WRITE_OPTIONS)
        trace: dict[int, float] = {}  # rows read so far -> current RSS (MiB): flat means bounded
        every = max(1, pq.ParquetFile(path).metadata.num_rows // 10)

        def traced():
            seen, mark = 0, every
            for batch in iter_metadata(source, [path.name], filters, {}, batch_rows=batch_rows or BATCH_ROWS):
                seen += batch.num_rows
                if seen >= mark:
                    trace[seen] = current_rss_mib()
                    mark += every
                yield batch

        start = time.perf_counter()
        rows, counts = filter_metadata(traced(), filters, cand.write_batch, rej.write_batch)
        cand.close()
        rej.close()
        seconds = time.perf_counter() - start
    kept = rows - sum(counts.values())
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds), "cores": cores,
            "batch_rows": batch_rows or BATCH_ROWS,
            "kept": kept, "rejected": counts,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_mib_by_rows": {k: round(v) for k, v in trace.items()}}


def current_rss_mib() -> float:
    """Resident set size now (not the peak), from /proc."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def baseline_rss() -> float:
    """Peak RSS of a process that only imports what the filter imports (subtracted for clarity)."""
    repo = str(Path(__file__).resolve().parents[1])
    code = (f"import resource, sys; sys.path.insert(0, {repo!r}); import components.data.curate_filters; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, action="append", help="row counts to measure (repeatable)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "lcmlora-bench-curate"))
    ap.add_argument("--repeat", type=int, default=3, help="runs per size; the best is reported")
    ap.add_argument("--batch-rows", type=int, help="record batch size (default: curate's BATCH_ROWS)")
    ap.add_argument("--_run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._run:
        print(json.dumps(run_filter(Path(args._run), args.batch_rows)))
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base = baseline_rss()
    results = []
    for rows in args.rows or [10_000_000]:
        path = workdir / f"laion-{rows}" / "metadata.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            generate(path, rows)
            print(f"generated {rows:,} rows ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f}s")
        runs = []
        for _ in range(args.repeat):
            extra = ["--batch-rows", str(args.batch_rows)] if args.batch_rows else []
            out = subprocess.run([sys.executable, __file__, "--_run", str(path), *extra], capture_output=True,
                                 text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = max(runs, key=lambda r: r["rows_per_s"])
        best["file_mib"] = round(path.stat().st_size / 2**20, 1)
        best["import_rss_mib"] = round(base, 1)
        best["all_rows_per_s"] = [r["rows_per_s"] for r in runs]
        results.append(best)
        print(f"{rows:>11,} rows, {best['cores']} cores, batches of {best['batch_rows']:,}: "
              f"{best['rows_per_s'] / 1e6:.2f} M rows/s (best of {args.repeat}: "
              f"{', '.join(f'{r / 1e6:.2f}' for r in best['all_rows_per_s'])}), peak RSS {best['peak_rss_mib']:.0f} MiB "
              f"(imports alone {base:.0f} MiB), kept {best['kept']:,}")
        trace = ", ".join(f"{int(k) / 1e6:g}M: {v}" for k, v in best["rss_mib_by_rows"].items())
        print(f"{'':13}RSS (MiB) after rows read: {trace}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
