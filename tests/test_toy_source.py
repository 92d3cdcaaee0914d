"""The toy source: LAION/img2dataset layout, planted defects, same bytes for the same seed."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.toy.source import DEFECT_COUNTS, DUPLICATES, write_toy_source

LAION_COLUMNS = {"URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toy") / "source"
    return out, write_toy_source(out, seed=0)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _members(folder: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


def test_same_seed_same_bytes_other_seed_differs(toy, tmp_path):
    folder, _ = toy
    again = write_toy_source(tmp_path / "again", seed=0)
    assert _digest(tmp_path / "again") == _digest(folder)
    write_toy_source(tmp_path / "other", seed=1)
    assert _digest(tmp_path / "other")["00000.tar"] != _digest(folder)["00000.tar"]
    assert again["defects"] == write_toy_source(tmp_path / "other", seed=1)["defects"]


def test_laion_layout_and_captions(toy):
    folder, summary = toy
    table = pq.read_table(folder / "metadata.parquet")
    assert LAION_COLUMNS | {"key", "shard"} <= set(table.column_names)
    assert table.num_rows == summary["rows"] == 1797 + DUPLICATES
    assert sorted(set(table["shard"].to_pylist())) == summary["shards"] == [f"{i:05d}.tar" for i in range(4)]
    keys = table["key"].to_pylist()
    assert len(set(keys)) == len(keys) and all(len(k) == 9 and k.isdigit() for k in keys)
    members = _members(folder)
    first = next(r for r in table.to_pylist() if r["key"] not in {k for v in summary["defect_keys"].values() for k in v})
    assert members[f"{first['key']}.txt"].decode() == first["TEXT"]
    assert first["TEXT"].startswith("a handwritten digit ") and first["TEXT"].split()[-1] in {
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    image = Image.open(io.BytesIO(members[f"{first['key']}.jpg"]))
    assert image.size == (first["WIDTH"], first["HEIGHT"]) == (32, 32)
    assert json.loads(members[f"{first['key']}.json"])["key"] == first["key"]
    assert (folder / "00000_stats.json").exists()


def test_every_planted_defect_is_there(toy):
    folder, summary = toy
    assert summary["defects"] == {**DEFECT_COUNTS, "duplicate": DUPLICATES}
    rows = {r["key"]: r for r in pq.read_table(folder / "metadata.parquet").to_pylist()}
    members = _members(folder)
    dk = summary["defect_keys"]
    assert all(rows[k]["AESTHETIC_SCORE"] < 6.0 for k in dk["low_aesthetic"])
    assert all(rows[k]["pwatermark"] > 0.5 for k in dk["watermark"])
    assert all(rows[k]["punsafe"] > 0.5 for k in dk["unsafe"])
    assert all(min(rows[k]["WIDTH"], rows[k]["HEIGHT"]) < 32 for k in dk["undersized"])
    assert all(rows[k]["WIDTH"] / rows[k]["HEIGHT"] >= 3 for k in dk["bad_aspect"])
    assert all(rows[k]["TEXT"].strip() == "" for k in dk["empty_caption"])
    scores = [rows[k]["AESTHETIC_SCORE"] for k in dk["nan_score"]]
    assert all(s is None or math.isnan(s) for s in scores) and None in scores
    assert all(f"{k}.txt" not in members and f"{k}.jpg" in members for k in dk["missing_txt"])
    for k in dk["corrupt_image"]:
        with pytest.raises(OSError):
            Image.open(io.BytesIO(members[f"{k}.jpg"])).load()
    # Each duplicate repeats the bytes of an earlier clean image.
    first_seen: dict[bytes, str] = {}
    for key in sorted(rows):
        first_seen.setdefault(members[f"{key}.jpg"], key)
    for k in dk["duplicate"]:
        original = first_seen[members[f"{k}.jpg"]]
        assert original < k and not any(original in v for v in dk.values())
    assert summary["expected_curated"] == summary["rows"] - sum(summary["expected_reasons"].values())
