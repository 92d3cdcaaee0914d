"""Curation of a source whose tar has garbage in its middle (issue 16, item 11): the rows lost
are `corrupt_shard` with the shard and byte offset, and the GX gate bounds their share
(`curate.max_unreadable_rate`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from components.config import CurateConfig, load_params
from components.data.curate import curate
from components.stages.inputs import curate_rel
from components.storage.storage import Storage
from components.toy.source import write_toy_source

REPO = Path(__file__).resolve().parents[1]
TOY_RESOLUTION = 32
GARBAGE = 4096


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corrupt") / "source"
    write_toy_source(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def clean(toy, tmp_path_factory):
    """The same source, uncorrupted: what every other reason should still count."""
    return curate(Storage(str(toy)), Storage(str(tmp_path_factory.mktemp("clean"))), "", CurateConfig(),
                  min_side=TOY_RESOLUTION)


def corrupted_copy(toy: Path, tmp_path: Path) -> tuple[Path, int]:
    """A copy of the source with 4 KiB of random bytes written over the middle of 00001.tar."""
    folder = tmp_path / "source"
    shutil.copytree(toy, folder)
    tar = folder / "00001.tar"
    middle = tar.stat().st_size // 2
    with open(tar, "r+b") as fh:
        fh.seek(middle)
        fh.write(os.urandom(GARBAGE))
    return folder, middle


def test_garbage_in_a_tar_is_reported_as_corrupt_shard_with_its_offset(toy, clean, tmp_path, caplog):
    folder, middle = corrupted_copy(toy, tmp_path)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="components.data.source_shards"):
        result = curate(Storage(str(folder)), Storage(str(out)), "", CurateConfig(max_unreadable_rate=1.0),
                        min_side=TOY_RESOLUTION)

    lost = result.rejected.get("corrupt_shard", 0)
    assert lost > 0, result.rejected
    # It used to be counted as missing images (216 of them): those, and missing captions, stay at
    # the clean source's counts.
    for reason in ("missing_image", "missing_txt"):
        assert result.rejected.get(reason, 0) == clean.rejected.get(reason, 0), reason
    assert result.kept < clean.kept and result.kept + sum(result.rejected.values()) == result.rows_in
    # rejected.parquet: one row per lost key, all from the corrupted shard, the detail naming it.
    rejected = pq.read_table(out / "rejected.parquet")
    corrupt = rejected.filter(pc.equal(rejected["reason"], "corrupt_shard"))
    assert corrupt.num_rows == lost
    assert all(k.startswith("00001") for k in corrupt["key"].to_pylist())
    (detail,) = set(corrupt["detail"].to_pylist())
    assert f"{folder / '00001.tar'}: corrupt tar header at byte " in detail
    # summary.json: shard, byte offset (the first 512-byte header block inside the garbage), rows.
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["unreadable_shards"]["00001.tar"]
    assert entry["reason"] == "corrupt_shard" and entry["rows"] == lost
    assert entry["offset"] % 512 == 0 and middle <= entry["offset"] < middle + GARBAGE
    assert f"at byte {entry['offset']}" in detail
    assert summary["rejected"]["corrupt_shard"] == lost
    # The log says it too.
    assert any("corrupt_shard 00001.tar" in r.getMessage() and f"at byte {entry['offset']}" in r.getMessage()
               for r in caplog.records)


def test_the_gate_fails_on_rows_lost_to_a_corrupt_shard_naming_it(toy, tmp_path, lcmlora_cli):
    """Default `curate.max_unreadable_rate` (0.01): the corrupted source fails the GX gate."""
    folder, _ = corrupted_copy(toy, tmp_path)
    root = tmp_path / "root"
    code, err = lcmlora_cli("curate", "--set", f"curate.source={folder}", "--set", f"storage.root={root}")
    assert code != 0
    assert "failed 1 expectation(s) of the data-quality gate" in err, err
    assert "expect_column_values_to_be_null" in err and '"column": "lost_in_shard"' in err
    assert "00001.tar (corrupt_shard at byte " in err
    # The CLI writes where the flows do: stages/curate/KEY (components/stages/inputs.py).
    cfg = load_params(REPO / "params.yaml", [f"curate.source={folder}", f"storage.root={root}"])
    curated = root / curate_rel(cfg, cfg.bases["toy"].resolution)
    assert not (curated / "manifest.parquet").exists()
    summary = json.loads((curated / "summary.json").read_text())
    assert summary["gate"]["success"] is False and "00001.tar" in summary["unreadable_shards"]


def test_a_clean_source_passes_the_shard_read_check(clean):
    assert "corrupt_shard" not in clean.rejected and "unreadable_shard" not in clean.rejected
