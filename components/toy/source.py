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

`write_laion_source` writes that layout for both toy worlds (the hard toy's scenes:
`components/toy/hard/source.py`) through the production writer of the format
(`components/data/laion_source.py`, which the synthesize stage writes with too); `ToySource` is
their source plug-in.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from components.config import Params
from components.data.laion_source import (
    metadata_table,
    sample_json,
    shard_stats,
    write_metadata,
    write_tar,
)
from components.toy.config import toy_config
from components.toy.folder_settings import stale_settings
from components.toy.render import caption_for, render_digit

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
class PlannedRow:
    """One row of a toy source as `plan_rows` planned it."""

    digit: int  # index into sklearn's digits (the hard toy: into its scenes)
    defect: str | None
    duplicate_of: int | None = None  # position (in the final order) of the original


def plan_rows(n_digits: int, rng: np.random.Generator) -> list[PlannedRow]:
    """Assign defects to digits and interleave duplicates after their originals."""
    order = rng.permutation(n_digits)
    defects: list[str | None] = [None] * n_digits
    cursor = 0
    for kind, count in DEFECT_COUNTS.items():
        for i in range(cursor, cursor + count):
            defects[order[i]] = kind
        cursor += count
    rows = [PlannedRow(digit=d, defect=defects[d]) for d in range(n_digits)]
    clean = [i for i, r in enumerate(rows) if r.defect is None]
    originals = rng.choice(clean, size=DUPLICATES, replace=False)
    # Sort positions: base rows at i, each duplicate somewhere after its original.
    placed = [(float(i), r) for i, r in enumerate(rows)]
    for orig in originals:
        placed.append((float(rng.uniform(orig + 0.5, n_digits)),
                       PlannedRow(rows[orig].digit, "duplicate", int(orig))))
    placed.sort(key=lambda pr: pr[0])
    # Duplicate rows point at their original's final position.
    final_pos = {id(r): p for p, (_, r) in enumerate(placed)}
    out: list[PlannedRow] = []
    for _, r in placed:
        if r.duplicate_of is not None:
            r = PlannedRow(r.digit, "duplicate", final_pos[id(rows[r.duplicate_of])])
        out.append(r)
    return out


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


MISSHAPEN = ("undersized", "bad_aspect")  # the defects that change an image's size


def misshapen(defect: str | None, image: Image.Image) -> Image.Image:
    """A square image as a row with `defect` shows it: half size when undersized, in the middle of a 3:1
    canvas when bad_aspect, else unchanged."""
    size = image.width
    if defect == "undersized":
        return image.resize((size // 2, size // 2), Image.Resampling.BICUBIC)
    if defect == "bad_aspect":
        wide = Image.new("RGB", (size * 3, size), image.getpixel((0, 0)))
        wide.paste(image, (size, 0))
        return wide
    return image


def _image_for(row: PlannedRow, digit8x8: np.ndarray, rng: np.random.Generator) -> Image.Image:
    return misshapen(row.defect, render_digit(digit8x8, rng))


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


def _members(record: dict[str, Any], jpeg: bytes) -> list[tuple[str, bytes]]:
    """A row's tar members: KEY.jpg, KEY.txt (unless its defect is missing_txt), KEY.json."""
    key = record["key"]
    txt = [] if record["_defect"] == "missing_txt" else [(f"{key}.txt", record["TEXT"].encode())]
    return [(f"{key}.jpg", jpeg), *txt, (f"{key}.json", sample_json(record))]


@dataclass(frozen=True)
class SourceDraw:
    """What one toy world draws into the shared LAION layout (`write_laion_source`); the rest is common."""

    image: Callable[[PlannedRow, np.random.Generator], Image.Image]  # a row's image (never a duplicate's)
    caption: Callable[[PlannedRow], str]  # a row's caption before the empty_caption defect
    url: Callable[[PlannedRow], str]  # a row's LAION URL
    summary: Callable[[list[dict[str, Any]]], dict[str, Any]]  # the world's own summary keys, from the records


def write_laion_source(output: str | Path, plan: list[PlannedRow], draw: SourceDraw, rng: np.random.Generator,
                       seed: int, shard_size: int = SHARD_SIZE) -> dict[str, Any]:
    """Write `plan`'s rows as `draw` draws them (with `rng`, after the plan) to `output`: tar shards,
    img2dataset stats, the metadata parquet and `toy_summary.json`; returns the summary.

    The summary holds the row count, the shards, each defect's count and keys, and the expected curation
    outcome for the default filters, plus `draw.summary`'s keys.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)

    # 1. Render every row (duplicates reuse their original's exact bytes).
    records: list[dict[str, Any]] = []
    jpegs: list[bytes] = []
    defect_keys: dict[str, list[str]] = {k: [] for k in [*DEFECT_COUNTS, "duplicate"]}
    for pos, row in enumerate(plan):
        shard_id, index = divmod(pos, shard_size)
        key = f"{shard_id:05d}{index:04d}"
        if row.defect == "duplicate":
            jpeg = jpegs[row.duplicate_of]
            width, height = records[row.duplicate_of]["WIDTH"], records[row.duplicate_of]["HEIGHT"]
        else:
            image = draw.image(row, rng)
            width, height = image.size
            jpeg = _jpeg(image)
            if row.defect == "corrupt_image":
                jpeg = _corrupt(jpeg, rng)
        caption = draw.caption(row)
        if row.defect == "empty_caption":
            caption = "" if rng.random() < 0.5 else "   "
        if row.defect is not None:
            defect_keys[row.defect].append(key)
        jpegs.append(jpeg)
        records.append({
            "key": key,
            "shard": f"{shard_id:05d}.tar",
            "URL": draw.url(row),
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
        with open(output / shard, "wb") as fh:
            write_tar(fh, [member for record, jpeg in members for member in _members(record, jpeg)])
        (output / f"{shard[:-4]}_stats.json").write_text(shard_stats(len(members)))

    # 3. The LAION-style metadata parquet.
    write_metadata(metadata_table(records), output / "metadata.parquet")

    # 4. What was planted, and what curation and encoding must therefore produce.
    rejected_by_curation = sum(len(v) for k, v in defect_keys.items() if EXPECTED_REASON[k] is not None)
    summary = {
        "seed": seed,
        "rows": len(records),
        "shards": shards,
        "defects": {k: len(v) for k, v in defect_keys.items()},
        "defect_keys": defect_keys,
        "expected_reasons": {EXPECTED_REASON[k]: len(v) for k, v in defect_keys.items() if EXPECTED_REASON[k]},
        "expected_curated": len(records) - rejected_by_curation,
        "expected_encoded": len(records) - rejected_by_curation - len(defect_keys["corrupt_image"]),
        **draw.summary(records),
    }
    (output / "toy_summary.json").write_text(json.dumps(summary, sort_keys=True, indent=1) + "\n")
    return summary


def write_toy_source(output: str | Path, seed: int = 0, shard_size: int = SHARD_SIZE) -> dict[str, Any]:
    """Write the toy source (sklearn's digits, `write_laion_source`'s layout) to `output` (a local folder);
    returns its summary, with the number of sklearn digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    plan = plan_rows(len(digits.images), rng)
    draw = SourceDraw(image=lambda row, rng: _image_for(row, digits.images[row.digit], rng),
                      caption=lambda row: caption_for(int(digits.target[row.digit])),
                      url=lambda row: f"{URL_PREFIX}/{row.digit:04d}.png",
                      summary=lambda records: {"digits": len(digits.images)})
    return write_laion_source(output, plan, draw, rng, seed, shard_size)


def check_source_settings(source_dir: Path, expected: dict[str, tuple[Any, Any]]) -> None:
    """ValueError when `source_dir`'s toy_summary.json was written with other settings than `expected`
    (a summary without a key holds that key's default); a folder without a summary is not checked."""
    summary_file = source_dir / "toy_summary.json"
    if not summary_file.is_file():
        return
    if stale := stale_settings(summary_file, expected):
        found = ", ".join(f"{key} {had!r} (asked: {want!r})" for key, (had, want) in stale.items())
        raise ValueError(f"{source_dir}: a toy source written with other settings: {found}; delete it "
                         f"or pass --set curate.source=ANOTHER_FOLDER")


@dataclass(frozen=True)
class ToySource:
    """A toy world's source writer plug-in (group `lcmlora.sources`): `plugin(params)` writes the world's
    source when `curate.source` is the world's folder and holds no metadata yet, and returns its summary
    (with `output`); None when nothing was written."""

    folder: Callable[[Params], str]  # the world's source folder in `params`
    write: Callable[[Path, Params], dict[str, Any]]  # writes the source to a folder, returns its summary
    # what an existing source's toy_summary.json must say (check_source_settings); None: not checked
    settings: Callable[[Params], dict[str, tuple[Any, Any]]] | None = None

    def __call__(self, params: Params) -> dict[str, Any] | None:
        folder = Path(self.folder(params))
        if Path(params.curate.source).resolve() != folder.resolve():
            return None
        if any(folder.glob("*.parquet")):
            if self.settings is not None:
                check_source_settings(folder, self.settings(params))
            return None
        return {**self.write(folder, params), "output": str(folder)}


def write_source(folder: Path, params: Params) -> dict[str, Any]:
    """The toy source (toy.seed) written to `folder`."""
    return write_toy_source(folder, seed=toy_config(params).seed)


# Entry point `toy` of group `lcmlora.sources`: the toy source in toy.source_dir.
ensure_toy_source = ToySource(lambda params: toy_config(params).source_dir, write_source)
