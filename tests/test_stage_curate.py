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


def test_two_runs_of_one_key_curate_it_once(tmp_path, monkeypatch):
    """Two bases of a fanned-out nightly at one resolution: the first claims the keyed folder, the other
    waits for its manifest and reuses it (issue 30, item 4); the claim is gone afterwards."""
    import json
    import threading
    import time

    import components.stages.curate as stage
    from components.config import parse_params
    from components.stages.curate import curate_stage
    from components.stages.inputs import curate_rel

    write_toy_source(tmp_path / "source", seed=0)
    params = parse_params({"storage": {"root": str(tmp_path / "root")}, "curate": {"source": str(tmp_path / "source")}})
    storage = Storage.from_config(params.storage)
    curations, real = [], stage.curate

    def slow_curate(*args, **kwargs):  # the real curation, counted and slowed so the runs overlap
        curations.append(threading.current_thread().name)
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "curate", slow_curate)
    outs, errors = {}, []

    def run(name: str) -> None:
        try:
            outs[name] = curate_stage(params, storage, min_side=32, claim_owner=f"run-{name}")
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,), name=n) for n in ("toy", "toy-ft")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(curations) == 1, f"curated {len(curations)} times: {curations}"
    a, b = outs["toy"], outs["toy-ft"]
    assert a.manifest == b.manifest and a.manifest_hash == b.manifest_hash
    assert sorted([a.reused, b.reused]) == [False, True]
    folder = curate_rel(params, 32)
    assert not storage.exists(f"{folder}.claim.json"), "the claim is released once the manifest exists"
    # a dead holder's claim is taken over: this run curates
    storage.delete(f"{folder}/manifest.parquet")
    storage.write_text(f"{folder}.claim.json", json.dumps({"owner": "dead", "claimed_at": time.time() - 3600}))
    again = curate_stage(params, storage, min_side=32, claim_owner="run-3")
    assert not again.reused and len(curations) == 2
