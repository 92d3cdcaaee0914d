"""The data-quality gate on a real Great Expectations context: a clean manifest passes with data
docs built; each kind of defect fails its own expectation, all listed at once; a disabled filter
is not checked."""

from __future__ import annotations

import pyarrow as pa
import pytest

from components.data.quality_gate import GateLimits, failure_message, run_manifest_gate

COLUMNS = ("key", "caption", "shard", "member", "width", "height", "image_sha256", "aesthetic", "pwatermark",
           "punsafe", "similarity")
ROWS = 20


def manifest(**columns) -> pa.Table:
    """A clean 20-row manifest; keyword arguments replace whole columns."""
    data = {
        "key": [f"{i:06d}" for i in range(ROWS)],
        "caption": [f"a handwritten digit {i % 10}" for i in range(ROWS)],
        "shard": ["00000.tar"] * ROWS,
        "member": [f"{i:06d}.jpg" for i in range(ROWS)],
        "width": [64] * ROWS,
        "height": [48] * ROWS,
        "image_sha256": [f"{i:064x}" for i in range(ROWS)],
        "aesthetic": [6.5] * ROWS,
        "pwatermark": [0.1] * ROWS,
        "punsafe": [0.0] * ROWS,
        "similarity": [0.3] * ROWS,
    }
    data.update(columns)
    return pa.table(data)


def limits(**overrides) -> GateLimits:
    values = {"columns": COLUMNS, "min_rows": 10, "min_aesthetic": 6.0, "max_watermark": 0.5, "max_unsafe": 0.5,
              "min_side": 32, "caption_min_chars": 1, "caption_max_chars": 100, "unique_images": True,
              "max_null_rate": 0.05}
    values.update(overrides)
    return GateLimits(**values)


def failed(result) -> set[tuple[str, str | None]]:
    """(expectation type, column) of every failed expectation."""
    return {(e["expectation_type"], e["kwargs"].get("column")) for v in result.description["validation_results"]
            for e in v["expectations"] if not e["success"]}


def test_clean_manifest_passes_and_builds_data_docs(tmp_path):
    result = run_manifest_gate(manifest(), limits(), tmp_path / "gx")
    assert result.success, failure_message(result.description, "clean")
    assert failed(result) == set()
    assert (result.docs_dir / "index.html").is_file()
    checked = {e["expectation_type"] for v in result.description["validation_results"] for e in v["expectations"]}
    assert {"expect_table_columns_to_match_set", "expect_table_row_count_to_be_between",
            "expect_column_values_to_be_unique", "expect_column_values_to_be_between"} <= checked


def test_every_defect_fails_its_expectation_and_all_are_listed(tmp_path):
    keys = [f"{i:06d}" for i in range(ROWS)]
    keys[1] = keys[0]  # duplicate key
    sha = [f"{i:064x}" for i in range(ROWS)]
    sha[3] = sha[2]  # duplicate image
    aesthetic = [6.5] * ROWS
    aesthetic[4] = 2.0  # below min_aesthetic
    width = [64] * ROWS
    width[5] = 8  # below min_side
    similarity = [None] * 5 + [0.3] * (ROWS - 5)  # 25% nulls > max_null_rate 5%
    caption = [f"a handwritten digit {i % 10}" for i in range(ROWS)]
    caption[6] = "x" * 200  # longer than caption_max_chars
    table = manifest(key=keys, image_sha256=sha, aesthetic=aesthetic, width=width, similarity=similarity,
                     caption=caption)
    result = run_manifest_gate(table, limits(), tmp_path / "gx")
    assert not result.success
    assert failed(result) == {
        ("expect_column_values_to_be_unique", "key"),
        ("expect_column_values_to_be_unique", "image_sha256"),
        ("expect_column_values_to_be_between", "aesthetic"),
        ("expect_column_values_to_be_between", "width"),
        ("expect_column_values_to_not_be_null", "similarity"),
        ("expect_column_value_lengths_to_be_between", "caption"),
    }
    message = failure_message(result.description, "curated/manifest.parquet")
    assert message.startswith("curated/manifest.parquet: the curated manifest failed 6 expectation(s)")
    assert message.count("\n  - ") == 6 and '"column": "aesthetic"' in message


def test_schema_and_row_count_fail_closed(tmp_path):
    table = manifest().slice(0, 5).append_column("extra", pa.array([1] * 5))
    result = run_manifest_gate(table, limits(), tmp_path / "gx")
    assert not result.success
    assert {("expect_table_columns_to_match_set", None), ("expect_table_row_count_to_be_between", None)} <= failed(result)


@pytest.mark.parametrize("off", ["min_aesthetic", "min_side"])
def test_a_disabled_filter_is_not_checked(tmp_path, off):
    table = manifest(aesthetic=[2.0] * ROWS) if off == "min_aesthetic" else manifest(width=[8] * ROWS)
    assert not run_manifest_gate(table, limits(), tmp_path / "on").success
    result = run_manifest_gate(table, limits(**{off: None}), tmp_path / "off")
    assert result.success, failure_message(result.description, off)
