"""The curate runner: explicit inputs in, a frozen output out, progress in the one shape."""

from __future__ import annotations

import dataclasses

import pytest

from components.config import CurateConfig
from components.progress import Progress
from components.stages.curate import CurateOutput, run_curate
from components.storage.storage import Storage
from components.toy.source import write_toy_source


def test_run_curate_writes_the_manifest_and_reports_progress(tmp_path):
    write_toy_source(tmp_path / "source", seed=0)
    reports: list[Progress] = []
    out = run_curate(CurateConfig(), source=Storage(str(tmp_path / "source")), storage=Storage(str(tmp_path / "root")),
                     output="stages/curate/k1", min_side=32, resolved_yaml="curate: {}\n", progress=reports.append)
    assert isinstance(out, CurateOutput) and out.manifest == "stages/curate/k1/manifest.parquet"
    assert (tmp_path / "root" / out.manifest).is_file() and len(out.manifest_hash) == 64
    assert 0 < out.kept < out.rows_in and out.rejected
    assert {r.stage for r in reports} == {"curate"} and {r.note for r in reports} == {"metadata", "images"}
    rows = [r.step for r in reports if r.note == "metadata"]
    assert rows == sorted(rows) and rows[-1] == out.rows_in
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.kept = 0  # type: ignore[misc]
