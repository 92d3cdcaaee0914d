"""The hard toy source: two-digit colour scenes in LAION/img2dataset format, with defects.

Same layout, columns, defects and determinism as the easy toy source
(`components/toy/source.py`, whose planning, score and tar helpers are reused), with two
differences: images are 64x64 scenes captioned compositionally, and clean images come at
varied *original sizes* (shorter side 64-128 px, aspect up to 1.5, the extra paper on the
right or bottom), so SDXL-family training has real `original_size` and `crop_top_left`
micro-conditioning to learn: a crop from (0, 0) shows the whole scene, other crops cut it.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from components.toy.hard.render import (
    HARD_SIZE,
    caption_for,
    random_look,
    random_scene,
    render_scene,
)
from components.toy.source import (
    DEFECT_COUNTS,
    EXPECTED_REASON,
    _corrupt,
    _json_value,
    _plan,
    _scores,
    _tar_add,
)

SHARD_SIZE = 512  # samples per tar shard
JPEG_QUALITY = 95
URL_PREFIX = "https://toy.lcmlora.invalid/hard"
SHORT_SIDES = (64, 80, 96, 128)  # shorter side of clean originals
ASPECTS = (1.0, 1.0, 1.25, 1.5)  # long/short ratios of clean originals (square half the time)


def original_canvas(scene_image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The scene at a varied original size: scaled to a random shorter side, paper added right or bottom."""
    short = int(rng.choice(SHORT_SIDES))
    long = round(short * float(rng.choice(ASPECTS)))
    scaled = scene_image.resize((short, short), Image.Resampling.BICUBIC)
    size = (long, short) if rng.random() < 0.5 else (short, long)
    canvas = Image.new("RGB", size, scene_image.getpixel((0, 0)))
    canvas.paste(scaled, (0, 0))
    return canvas


def _image_for(defect: str | None, scene_image: Image.Image, rng: np.random.Generator) -> Image.Image:
    if defect == "undersized":
        return scene_image.resize((HARD_SIZE // 2, HARD_SIZE // 2), Image.Resampling.BICUBIC)
    if defect == "bad_aspect":
        wide = Image.new("RGB", (HARD_SIZE * 3, HARD_SIZE), scene_image.getpixel((0, 0)))
        wide.paste(scene_image, (HARD_SIZE, 0))
        return wide
    return original_canvas(scene_image, rng)


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_hard_source(output: str | Path, rows: int = 2000, seed: int = 0,
                      shard_size: int = SHARD_SIZE, look_fraction: float = 0.0, layout: str = "narrow",
                      look: Callable[[np.random.Generator], np.ndarray] = random_look) -> dict[str, Any]:
    """Write `rows` scenes (plus duplicates) to `output`; returns the summary (also `toy_summary.json`).

    `look_fraction` of the images are drawn on other papers (`look`, by default `render.random_look`,
    from their own generator: with 0 the source is the same bytes as without it); the summary counts
    them. Digits sit as `layout` places them (render.py:render_scene)."""
    if not 0.0 <= look_fraction <= 1.0:
        raise ValueError(f"toy.hard.look_fraction must be in [0, 1], got {look_fraction}")
    from sklearn.datasets import load_digits

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    plan = _plan(rows, rng)
    scenes = [random_scene(digits.target, rng) for _ in range(rows)]
    look_rng = np.random.default_rng([seed, 23])
    looks = 0

    records: list[dict[str, Any]] = []
    jpegs: list[bytes] = []
    defect_keys: dict[str, list[str]] = {k: [] for k in [*DEFECT_COUNTS, "duplicate"]}
    for pos, row in enumerate(plan):
        shard_id, index = divmod(pos, shard_size)
        key = f"{shard_id:05d}{index:04d}"
        scene, i, j, right_first = scenes[row.digit]
        if row.defect == "duplicate":
            jpeg = jpegs[row.duplicate_of]
            width, height = records[row.duplicate_of]["WIDTH"], records[row.duplicate_of]["HEIGHT"]
        else:
            background = look(look_rng) if look_fraction and look_rng.random() < look_fraction else None
            looks += background is not None
            scene_image = render_scene(digits.images[i], digits.images[j], scene, rng, background=background, layout=layout)
            image = _image_for(row.defect, scene_image, rng)
            width, height = image.size
            jpeg = _jpeg(image)
            if row.defect == "corrupt_image":
                jpeg = _corrupt(jpeg, rng)
        caption = caption_for(scene, right_first)
        if row.defect == "empty_caption":
            caption = "" if rng.random() < 0.5 else "   "
        if row.defect is not None:
            defect_keys[row.defect].append(key)
        jpegs.append(jpeg)
        records.append({
            "key": key, "shard": f"{shard_id:05d}.tar", "URL": f"{URL_PREFIX}/{row.digit:05d}.png",
            "TEXT": caption, "WIDTH": width, "HEIGHT": height,
            **_scores(row.defect if row.defect != "duplicate" else None, rng),
            "status": "success", "original_width": width, "original_height": height,
            "_defect": row.defect, "_parts": list(scene.parts()),
        })

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

    columns = {"key": pa.string(), "shard": pa.string(), "URL": pa.string(), "TEXT": pa.string(),
               "WIDTH": pa.int64(), "HEIGHT": pa.int64(), "similarity": pa.float64(), "punsafe": pa.float64(),
               "pwatermark": pa.float64(), "AESTHETIC_SCORE": pa.float64(), "status": pa.string(),
               "original_width": pa.int64(), "original_height": pa.int64()}
    table = pa.table({name: pa.array([r[name] for r in records], kind, from_pandas=False)
                      for name, kind in columns.items()})
    pq.write_table(table, output / "metadata.parquet", compression="zstd")

    rejected = sum(len(v) for k, v in defect_keys.items() if EXPECTED_REASON[k] is not None)
    summary = {
        "seed": seed, "rows": len(records), "scenes": rows, "shards": shards,
        "look_fraction": look_fraction, "other_looks": looks, "layout": layout,
        "defects": {k: len(v) for k, v in defect_keys.items()}, "defect_keys": defect_keys,
        "expected_reasons": {EXPECTED_REASON[k]: len(v) for k, v in defect_keys.items() if EXPECTED_REASON[k]},
        "expected_curated": len(records) - rejected,
        "expected_encoded": len(records) - rejected - len(defect_keys["corrupt_image"]),
        "sizes": sorted({f"{r['WIDTH']}x{r['HEIGHT']}" for r in records if r["_defect"] is None}),
    }
    (output / "toy_summary.json").write_text(json.dumps(summary, sort_keys=True, indent=1) + "\n")
    return summary
