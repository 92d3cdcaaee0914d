"""Curation: every planted toy defect rejected for the right reason, bad input handled, GX gate."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from components.config import CurateConfig
from components.data.curate import CurationEmpty, curate
from components.data.curate_filters import Filters, SourceError, filter_metadata, iter_metadata
from components.data.curate_schema import MANIFEST_SCHEMA
from components.data.quality_gate import ManifestGateFailed
from components.storage.storage import Storage
from components.toy.source import EXPECTED_REASON, write_toy_source

TOY_RESOLUTION = 32


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("curate") / "source"
    return folder, write_toy_source(folder, seed=0)


@pytest.fixture(scope="module")
def curated(toy, tmp_path_factory) -> tuple[Storage, object]:
    folder, _ = toy
    storage = Storage(str(tmp_path_factory.mktemp("curated")))
    result = curate(Storage(str(folder)), storage, "curated", CurateConfig(), min_side=TOY_RESOLUTION,
                    resolved_config="curate: {}\n")
    return storage, result


def _copy_source(toy, tmp_path: Path) -> Path:
    dst = tmp_path / "source"
    shutil.copytree(toy[0], dst)
    return dst


def _rewrite_metadata(folder: Path, change) -> None:
    table = pq.read_table(folder / "metadata.parquet")
    pq.write_table(change(table), folder / "metadata.parquet")


def test_every_planted_defect_gets_its_reason(toy, curated):
    _, summary = toy
    storage, result = curated
    assert result.rows_in == summary["rows"]
    assert result.rejected == summary["expected_reasons"]
    assert result.kept == summary["expected_curated"]
    rejected = pq.read_table(storage.url("curated/rejected.parquet"))
    reason_of = dict(zip(rejected["key"].to_pylist(), rejected["reason"].to_pylist(), strict=True))
    assert len(reason_of) == rejected.num_rows  # one reason per rejected row
    for kind, keys in summary["defect_keys"].items():
        expected = EXPECTED_REASON[kind]
        assert {reason_of.get(k) for k in keys} == {expected}, kind
    details = dict(zip(rejected["reason"].to_pylist(), rejected["detail"].to_pylist(), strict=True))
    assert "curate.min_aesthetic" in details["low_aesthetic"]
    assert details["duplicate"].startswith("same image bytes as ")


def test_manifest_contract_and_hash(toy, curated):
    storage, result = curated
    manifest = pq.read_table(storage.url("curated/manifest.parquet"))
    assert manifest.schema.equals(MANIFEST_SCHEMA)
    assert manifest.num_rows == result.kept
    assert pc.min(manifest["aesthetic"]).as_py() >= 6.0 and pc.max(manifest["pwatermark"]).as_py() <= 0.5
    assert pc.min(manifest["width"]).as_py() >= TOY_RESOLUTION
    assert pc.count_distinct(manifest["image_sha256"]).as_py() == manifest.num_rows
    assert manifest["member"].to_pylist()[0] == manifest["key"].to_pylist()[0] + ".jpg"
    data = storage.read_bytes("curated/manifest.parquet")
    summary = json.loads(storage.read_text("curated/summary.json"))
    assert result.manifest_hash == summary["manifest_hash"] == hashlib.sha256(data).hexdigest()
    assert summary["gate"]["success"] and summary["rejected"] == result.rejected
    assert storage.exists("curated/gx/index.html") and storage.exists("curated/params.yaml")
    assert any(n.endswith(".html") for n in storage.ls("curated/gx/validations", recursive=True))


def test_rerun_gives_the_same_manifest_hash(toy, curated, tmp_path):
    other = Storage(str(tmp_path / "again"))
    again = curate(Storage(str(toy[0])), other, "curated", CurateConfig(), min_side=TOY_RESOLUTION)
    assert again.manifest_hash == curated[1].manifest_hash


def test_streaming_batches_give_the_same_split(toy):
    source = Storage(str(toy[0]))
    filters = Filters(min_side=TOY_RESOLUTION)

    def run(rows: int) -> tuple[int, dict, list]:
        kept: list = []
        n, counts = filter_metadata(iter_metadata(source, ["metadata.parquet"], filters, {}, batch_rows=rows), filters,
                                    lambda b: kept.extend(b.column("key").to_pylist()), lambda b: None)
        return n, counts, kept

    assert run(37) == run(1 << 17)


def test_column_mapping_for_other_sources(toy, tmp_path):
    folder = _copy_source(toy, tmp_path)
    _rewrite_metadata(folder, lambda t: t.rename_columns(
        ["id" if c == "key" else "score" if c == "AESTHETIC_SCORE" else "caption_text" if c == "TEXT" else c
         for c in t.column_names]))
    with pytest.raises(SourceError, match=r"missing column\(s\) key .*AESTHETIC_SCORE.*curate.columns"):
        curate(Storage(str(folder)), Storage(str(tmp_path / "out")), "", CurateConfig(), min_side=TOY_RESOLUTION)
    cfg = CurateConfig(columns={"id": "key", "score": "AESTHETIC_SCORE", "caption_text": "TEXT"})
    result = curate(Storage(str(folder)), Storage(str(tmp_path / "out")), "", cfg, min_side=TOY_RESOLUTION)
    assert result.kept == toy[1]["expected_curated"]


def test_wrong_column_type_is_a_clear_error(toy, tmp_path):
    folder = _copy_source(toy, tmp_path)
    _rewrite_metadata(folder, lambda t: t.set_column(
        t.schema.get_field_index("pwatermark"), "pwatermark", pc.cast(t["pwatermark"], pa.string())))
    with pytest.raises(SourceError, match=r"metadata.parquet: column pwatermark has type string, expected a number"):
        curate(Storage(str(folder)), Storage(str(tmp_path / "out")), "", CurateConfig(), min_side=TOY_RESOLUTION)


def test_no_rows_left_names_the_filters(toy, tmp_path):
    out = Storage(str(tmp_path / "out"))
    with pytest.raises(CurationEmpty, match=r"no rows left.*low_aesthetic: \d+ rows \(AESTHETIC_SCORE < 9.5 "
                                            r"\(curate.min_aesthetic\)\)"):
        curate(Storage(str(toy[0])), out, "", CurateConfig(min_aesthetic=9.5), min_side=TOY_RESOLUTION)
    assert not out.exists("manifest.parquet")


def test_failing_gate_reports_gx_description_and_keeps_docs(toy, curated, tmp_path):
    out = Storage(str(tmp_path / "out"))
    out.write_bytes("manifest.parquet", b"stale")  # a stale manifest must not survive a failed gate
    with pytest.raises(ManifestGateFailed) as err:
        curate(Storage(str(toy[0])), out, "", CurateConfig(min_rows=100_000), min_side=TOY_RESOLUTION)
    message = str(err.value)
    assert "expect_table_row_count_to_be_between" in message and '"min_value": 100000' in message
    assert f'"observed_value": {curated[1].kept}' in message
    assert not out.exists("manifest.parquet")
    assert out.exists("gx/index.html") and out.exists("rejected.parquet")
    assert json.loads(out.read_text("summary.json"))["gate"]["success"] is False


def test_truncated_tar_and_missing_shard_are_counted(toy, tmp_path):
    folder = _copy_source(toy, tmp_path)
    tar = folder / "00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 100])  # cut mid-member
    (folder / "00003.tar").unlink()
    allow_losses = CurateConfig(max_unreadable_rate=1.0)  # the default gate fails this source (test_curate_corrupt.py)
    result = curate(Storage(str(folder)), Storage(str(tmp_path / "out")), "", allow_losses, min_side=TOY_RESOLUTION)
    rejected = pq.read_table(tmp_path / "out" / "rejected.parquet")
    unreadable = rejected.filter(pc.equal(rejected["reason"], "unreadable_shard"))
    details = set(unreadable["detail"].to_pylist())
    assert any("00001.tar: truncated or corrupt tar" in d for d in details)
    assert any("00003.tar: shard not found" in d for d in details)
    assert all(k.startswith(("00001", "00003")) for k in unreadable["key"].to_pylist())
    assert result.kept + sum(result.rejected.values()) == result.rows_in
    assert result.kept > 500  # shards 00000 and 00002 and the first half of 00001 survive


def test_s3_source_and_storage(toy, s3_env):
    """The same curation from an s3:// source into an s3:// root, on a real SeaweedFS."""
    bucket = s3_env.make_bucket()
    source = s3_env.storage(bucket, "source")
    for path in sorted(toy[0].iterdir()):
        source.put_file(path, path.name)
    out = s3_env.storage(bucket, "artifacts")
    result = curate(source, out, "curated", CurateConfig(), min_side=TOY_RESOLUTION)
    assert result.kept == toy[1]["expected_curated"]
    assert hashlib.sha256(out.read_bytes("curated/manifest.parquet")).hexdigest() == result.manifest_hash
    assert out.exists("curated/gx/index.html")


def test_cli_curate_dry_run_and_run(toy, tmp_path):
    from typer.testing import CliRunner

    from components.config import load_params
    from components.stages.inputs import curate_rel
    from flows.cli import app

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    args = ["curate", "--params", str(params), "--set", f"curate.source={toy[0]}",
            "--set", f"storage.root={tmp_path / 'root'}"]
    dry = CliRunner().invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0 and f"source: {toy[0]}" in dry.stdout
    assert not (tmp_path / "root").exists()
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert f"curated {toy[1]['expected_curated']} of {toy[1]['rows']} rows" in run.stdout
    # One layout: the folder the flows use, stages/curate/KEY (components/stages/keys.py), named on stdout.
    cfg = load_params(params, [f"curate.source={toy[0]}", f"storage.root={tmp_path / 'root'}"])
    manifest = tmp_path / "root" / curate_rel(cfg, cfg.bases["toy"].resolution) / "manifest.parquet"
    assert manifest.parent.parent == tmp_path / "root" / "stages" / "curate"
    assert manifest.exists() and f"-> {manifest}" in run.stdout
    before = manifest.stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert f"reused {toy[1]['expected_curated']} of {toy[1]['rows']} rows -> {manifest}" in again.stdout
    assert manifest.stat().st_mtime_ns == before  # reused, not rewritten
    empty = CliRunner().invoke(app, [*args, "--set", "curate.min_aesthetic=11"])
    assert empty.exit_code != 0 and "no rows left" in str(empty.exception)


def test_gate_checks_null_rate_of_optional_columns(toy, tmp_path):
    folder = _copy_source(toy, tmp_path)
    _rewrite_metadata(folder, lambda t: t.drop_columns(["similarity"]))
    with pytest.raises(ManifestGateFailed, match=r'expect_column_values_to_not_be_null \{"column": "similarity", '
                                                 r'"mostly": 0.95\}'):
        curate(Storage(str(folder)), Storage(str(tmp_path / "out")), "", CurateConfig(), min_side=TOY_RESOLUTION)
    result = curate(Storage(str(folder)), Storage(str(tmp_path / "out")), "", CurateConfig(max_null_rate=1.0),
                    min_side=TOY_RESOLUTION)
    assert result.kept == toy[1]["expected_curated"]
