"""The toy source: sklearn's 1,797 handwritten digits in LAION/img2dataset format, with defects.

Layout (what img2dataset writes for a LAION metadata parquet, plus the metadata itself):

    metadata.parquet     one row per sample, LAION column names (URL, TEXT, WIDTH, HEIGHT,
                         similarity, punsafe, pwatermark, AESTHETIC_SCORE) plus key, shard,
                         status, original_width, original_height
    00000.tar ...        webdataset shards: KEY.jpg, KEY.txt (the caption), KEY.json
    00000_stats.json     img2dataset per-shard statistics
    toy_summary.json     what was planted: defect counts and keys, expected curation result

Every defective row carries exactly one defect, so the counts a curation run must find are
known in advance (`toy_summary.json`). Duplicates are byte-identical copies of a clean image
placed after their original, so "keep the first" keeps the original. The output is a pure
function of the seed: the same seed writes the same bytes (fixed tar headers, sorted JSON).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from components.toy.render import TOY_SIZE, caption_for, render_digit

SHARD_SIZE = 512  # samples per tar shard
JPEG_QUALITY = 95
URL_PREFIX = "https://toy.lcmlora.invalid/digits"

# How many base rows carry each defect (each row at most one), and how many duplicate rows
# are added on top. Curation reasons these map to are in `EXPECTED_REASON`.
DEFECT_COUNTS: dict[str, int] = {
    "corrupt_image": 20,  # truncated JPEG or garbage bytes: rejected by encode's decoder
    "empty_caption": 30,  # "" or whitespace only
    "low_aesthetic": 120,  # AESTHETIC_SCORE below the LAION-Aesthetics 6.0 threshold
    "watermark": 50,  # pwatermark above 0.5
    "unsafe": 30,  # punsafe above 0.5
    "undersized": 40,  # 16x16 image, shorter side below the toy resolution
    "bad_aspect": 30,  # 96x32 image, aspect ratio 3
    "nan_score": 16,  # AESTHETIC_SCORE NaN (half) or null (half)
    "missing_txt": 10,  # the shard has KEY.jpg and KEY.json but no KEY.txt
}
DUPLICATES = 60  # extra rows whose image bytes equal an earlier clean row's

# The curation rejection reason each defect must produce (corrupt images pass curation).
EXPECTED_REASON: dict[str, str | None] = {
    "corrupt_image": None,
    "empty_caption": "caption_length",
    "low_aesthetic": "low_aesthetic",
    "watermark": "watermark",
    "unsafe": "unsafe",
    "undersized": "undersized",
    "bad_aspect": "aspect_ratio",
    "nan_score": "missing_score",
    "missing_txt": "missing_txt",
    "duplicate": "duplicate",
}


@dataclass(frozen=True)
class _Row:
    digit: int  # index into sklearn's digits
    defect: str | None
    duplicate_of: int | None = None  # position (in the final order) of the original


def _plan(n_digits: int, rng: np.random.Generator) -> list[_Row]:
    """Assign defects to digits and interleave duplicates after their originals."""
    order = rng.permutation(n_digits)
    defects: list[str | None] = [None] * n_digits
    cursor = 0
    for kind, count in DEFECT_COUNTS.items():
        for i in range(cursor, cursor + count):
            defects[order[i]] = kind
        cursor += count
    rows = [_Row(digit=d, defect=defects[d]) for d in range(n_digits)]
    clean = [i for i, r in enumerate(rows) if r.defect is None]
    originals = rng.choice(clean, size=DUPLICATES, replace=False)
    # Sort positions: base rows at i, each duplicate somewhere after its original.
    placed = [(float(i), r) for i, r in enumerate(rows)]
    for orig in originals:
        placed.append((float(rng.uniform(orig + 0.5, n_digits)), _Row(rows[orig].digit, "duplicate", int(orig))))
    placed.sort(key=lambda pr: pr[0])
    # Duplicate rows point at their original's final position.
    final_pos = {id(r): p for p, (_, r) in enumerate(placed)}
    out: list[_Row] = []
    for _, r in placed:
        if r.duplicate_of is not None:
            r = _Row(r.digit, "duplicate", final_pos[id(rows[r.duplicate_of])])
        out.append(r)
    return out


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _image_for(row: _Row, digit8x8: np.ndarray, rng: np.random.Generator) -> Image.Image:
    image = render_digit(digit8x8, rng)
    if row.defect == "undersized":
        return image.resize((TOY_SIZE // 2, TOY_SIZE // 2), Image.Resampling.BICUBIC)
    if row.defect == "bad_aspect":
        wide = Image.new("RGB", (TOY_SIZE * 3, TOY_SIZE), image.getpixel((0, 0)))
        wide.paste(image, (TOY_SIZE, 0))
        return wide
    return image


def _corrupt(jpeg: bytes, rng: np.random.Generator) -> bytes:
    """Half truncated JPEGs, half bytes that are no image at all."""
    if rng.random() < 0.5:
        return jpeg[: len(jpeg) // 2]
    return b"\x89NOTANIMAGE" + rng.bytes(64)


def _scores(defect: str | None, rng: np.random.Generator) -> dict[str, float | None]:
    scores: dict[str, float | None] = {
        "similarity": round(float(rng.uniform(0.28, 0.38)), 4),
        "punsafe": round(float(rng.uniform(0.0, 0.1)), 4),
        "pwatermark": round(float(rng.uniform(0.0, 0.3)), 4),
        "AESTHETIC_SCORE": round(float(rng.uniform(6.1, 7.9)), 4),
    }
    if defect == "low_aesthetic":
        scores["AESTHETIC_SCORE"] = round(float(rng.uniform(3.0, 5.9)), 4)
    elif defect == "watermark":
        scores["pwatermark"] = round(float(rng.uniform(0.6, 1.0)), 4)
    elif defect == "unsafe":
        scores["punsafe"] = round(float(rng.uniform(0.6, 1.0)), 4)
    elif defect == "nan_score":
        scores["AESTHETIC_SCORE"] = float("nan") if rng.random() < 0.5 else None
    return scores


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a member with fixed metadata, so the tar bytes depend only on the content."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def write_toy_source(output: str | Path, seed: int = 0, shard_size: int = SHARD_SIZE) -> dict[str, Any]:
    """Write the toy source to `output` (a local folder) and return its summary.

    The summary (also written as `toy_summary.json`) holds the row count, the shards, each
    defect's count and keys, and the expected curation outcome for the default filters.
    """
    from sklearn.datasets import load_digits

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    rows = _plan(len(digits.images), rng)

    # 1. Render every row (duplicates reuse their original's exact bytes).
    records: list[dict[str, Any]] = []
    jpegs: list[bytes] = []
    defect_keys: dict[str, list[str]] = {k: [] for k in [*DEFECT_COUNTS, "duplicate"]}
    for pos, row in enumerate(rows):
        shard_id, index = divmod(pos, shard_size)
        key = f"{shard_id:05d}{index:04d}"
        if row.defect == "duplicate":
            jpeg = jpegs[row.duplicate_of]
            width, height = records[row.duplicate_of]["WIDTH"], records[row.duplicate_of]["HEIGHT"]
        else:
            image = _image_for(row, digits.images[row.digit], rng)
            width, height = image.size
            jpeg = _jpeg(image)
            if row.defect == "corrupt_image":
                jpeg = _corrupt(jpeg, rng)
        caption = caption_for(int(digits.target[row.digit]))
        if row.defect == "empty_caption":
            caption = "" if rng.random() < 0.5 else "   "
        if row.defect is not None:
            defect_keys[row.defect].append(key)
        jpegs.append(jpeg)
        records.append({
            "key": key,
            "shard": f"{shard_id:05d}.tar",
            "URL": f"{URL_PREFIX}/{row.digit:04d}.png",
            "TEXT": caption,
            "WIDTH": width,
            "HEIGHT": height,
            **_scores(row.defect if row.defect != "duplicate" else None, rng),
            "status": "success",
            "original_width": width,
            "original_height": height,
            "_defect": row.defect,
        })

    # 2. Tar shards (KEY.jpg, KEY.txt, KEY.json) and img2dataset per-shard stats.
    shards = sorted({r["shard"] for r in records})
    for shard in shards:
        members = [(r, j) for r, j in zip(records, jpegs, strict=True) if r["shard"] == shard]
        with tarfile.open(output / shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for record, jpeg in members:
                key = record["key"]
                meta = {k: _json_value(v) for k, v in record.items() if not k.startswith("_") and k != "shard"}
                meta.update(url=record["URL"], caption=record["TEXT"], error_message=None)
                _tar_add(tar, f"{key}.jpg", jpeg)
                if record["_defect"] != "missing_txt":
                    _tar_add(tar, f"{key}.txt", record["TEXT"].encode())
                _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        stats = {"count": len(members), "successes": len(members), "failed_to_download": 0,
                 "failed_to_resize": 0, "status_dict": {"success": len(members)}}
        (output / f"{shard[:-4]}_stats.json").write_text(json.dumps(stats, sort_keys=True, indent=1) + "\n")

    # 3. The LAION-style metadata parquet.
    table = pa.table({
        "key": pa.array([r["key"] for r in records], pa.string()),
        "shard": pa.array([r["shard"] for r in records], pa.string()),
        "URL": pa.array([r["URL"] for r in records], pa.string()),
        "TEXT": pa.array([r["TEXT"] for r in records], pa.string()),
        "WIDTH": pa.array([r["WIDTH"] for r in records], pa.int64()),
        "HEIGHT": pa.array([r["HEIGHT"] for r in records], pa.int64()),
        "similarity": pa.array([r["similarity"] for r in records], pa.float64()),
        "punsafe": pa.array([r["punsafe"] for r in records], pa.float64()),
        "pwatermark": pa.array([r["pwatermark"] for r in records], pa.float64()),
        "AESTHETIC_SCORE": pa.array([r["AESTHETIC_SCORE"] for r in records], pa.float64(), from_pandas=False),
        "status": pa.array([r["status"] for r in records], pa.string()),
        "original_width": pa.array([r["original_width"] for r in records], pa.int64()),
        "original_height": pa.array([r["original_height"] for r in records], pa.int64()),
    })
    pq.write_table(table, output / "metadata.parquet", compression="zstd")

    # 4. What was planted, and what curation and encoding must therefore produce.
    rejected_by_curation = sum(len(v) for k, v in defect_keys.items() if EXPECTED_REASON[k] is not None)
    summary = {
        "seed": seed,
        "rows": len(records),
        "digits": len(digits.images),
        "shards": shards,
        "defects": {k: len(v) for k, v in defect_keys.items()},
        "defect_keys": defect_keys,
        "expected_reasons": {EXPECTED_REASON[k]: len(v) for k, v in defect_keys.items() if EXPECTED_REASON[k]},
        "expected_curated": len(records) - rejected_by_curation,
        "expected_encoded": len(records) - rejected_by_curation - len(defect_keys["corrupt_image"]),
    }
    (output / "toy_summary.json").write_text(json.dumps(summary, sort_keys=True, indent=1) + "\n")
    return summary


def ensure_toy_source(params) -> dict[str, Any] | None:
    """Write the toy source when `curate.source` is the toy folder (toy.source_dir) and holds no
    metadata yet (entry point `toy` of group `lcmlora.sources`). Returns the summary, or None when
    nothing was written."""
    from components.toy.config import toy_config

    toy = toy_config(params)
    toy_dir = Path(toy.source_dir)
    if Path(params.curate.source).resolve() != toy_dir.resolve() or any(toy_dir.glob("*.parquet")):
        return None
    return {**write_toy_source(toy_dir, seed=toy.seed), "output": str(toy_dir)}
