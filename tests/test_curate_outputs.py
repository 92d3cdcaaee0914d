"""A failed or empty curation leaves no file of a previous run beside no manifest (issue 16 item 12):
the curate folder is replaced whole (local) or cleared first (S3) by components/data/curate.py."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components.config import CurateConfig
from components.data.curate import CurationEmpty, curate
from components.data.quality_gate import ManifestGateFailed
from components.storage.storage import Storage
from components.toy.source import write_toy_source

TOY_RESOLUTION = 32


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Storage:
    folder = tmp_path_factory.mktemp("curate-outputs") / "source"
    write_toy_source(folder, seed=0)
    return Storage(str(folder))


def run(source: Storage, out: Storage, **cfg):
    return curate(source, out, "curated", CurateConfig(**cfg), min_side=TOY_RESOLUTION, resolved_config="x: 1\n")


def names(out: Storage) -> list[str]:
    return sorted({n.split("/", 1)[0] for n in out.ls("curated", recursive=True)})


def test_empty_curation_after_a_good_one_leaves_only_its_own_files(source, tmp_path):
    out = Storage(str(tmp_path))
    good = run(source, out)
    assert names(out) == ["gx", "manifest.parquet", "params.yaml", "rejected.parquet", "summary.json"]
    with pytest.raises(CurationEmpty):
        run(source, out, min_aesthetic=9.5)
    assert names(out) == ["params.yaml", "rejected.parquet", "summary.json"]  # the first run's gx/ is gone
    summary = json.loads(out.read_text("curated/summary.json"))
    assert summary["kept"] == 0 and summary["manifest_hash"] is None and "gate" not in summary
    rejected = pq.read_table(Path(out.url("curated/rejected.parquet")))
    assert rejected.num_rows == good.rows_in  # this run rejected every row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curated"]  # no staging sibling left


def test_failed_gate_after_a_good_one_describes_only_the_failed_run(source, tmp_path):
    out = Storage(str(tmp_path))
    good = run(source, out)
    with pytest.raises(ManifestGateFailed):
        run(source, out, min_rows=100_000)
    assert names(out) == ["gx", "params.yaml", "rejected.parquet", "summary.json"]
    summary = json.loads(out.read_text("curated/summary.json"))
    assert summary["gate"]["success"] is False and summary["manifest_hash"] is None
    assert summary["kept"] == good.kept


def test_s3_empty_curation_after_a_good_one_leaves_no_stale_files(source, s3_env):
    out = s3_env.storage(s3_env.make_bucket(), "run")
    run(source, out)
    assert "gx" in names(out) and "manifest.parquet" in names(out)
    with pytest.raises(CurationEmpty):
        run(source, out, min_aesthetic=9.5)
    assert names(out) == ["params.yaml", "rejected.parquet", "summary.json"]
    assert json.loads(out.read_text("curated/summary.json"))["kept"] == 0
