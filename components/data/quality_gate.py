"""The data-quality gate over a curated manifest: a Great Expectations 1.x suite.

The suite checks the schema, value ranges (each enabled filter's threshold), null rates, key
uniqueness and a minimum row count; a second one bounds the share of rows lost to corrupt or
unreadable source shards (`curate.max_unreadable_rate`). It runs in a throwaway file-backed GX context (so data
docs can be built) and fails closed: `ManifestGateFailed` carries GX's own description of
every failed expectation. The data docs HTML is returned as a folder for the caller to save
beside the manifest.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa


class ManifestGateFailed(RuntimeError):
    """The curated manifest failed its expectation suite; the message lists every failure."""


@dataclass(frozen=True)
class GateLimits:
    """The thresholds the manifest must satisfy (the curation filters that were applied)."""

    columns: tuple[str, ...]  # the exact manifest schema
    min_rows: int
    min_aesthetic: float | None
    max_watermark: float | None
    max_unsafe: float | None
    min_side: int | None
    caption_min_chars: int
    caption_max_chars: int
    unique_images: bool  # image_sha256 must be unique (dedup was on)
    max_null_rate: float = 0.05  # optional columns (similarity) may be null this often
    max_unreadable_rate: float = 0.01  # share of image-checked rows lost to corrupt or unreadable shards


@dataclass
class GateResult:
    success: bool
    description: dict[str, Any]  # GX's describe_dict() of the validation
    docs_dir: Path  # data docs site (index.html and its pages); lives until the caller's tmp dir goes


def _suite(limits: GateLimits) -> list[Any]:
    import great_expectations.expectations as gxe

    # 1. Schema and size.
    exps: list[Any] = [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(limits.columns), exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=limits.min_rows),
    ]
    # 2. Identity: keys unique, required fields never null.
    exps.append(gxe.ExpectColumnValuesToBeUnique(column="key"))
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("key", "caption", "shard", "member",
                                                                    "width", "height")]
    if limits.unique_images:
        exps.append(gxe.ExpectColumnValuesToBeUnique(column="image_sha256"))
    # 3. Ranges: what each enabled filter promised. Scores of an enabled filter have null rate 0.
    if limits.min_aesthetic is not None:
        exps += [gxe.ExpectColumnValuesToNotBeNull(column="aesthetic"),
                 gxe.ExpectColumnValuesToBeBetween(column="aesthetic", min_value=limits.min_aesthetic, max_value=10.0)]
    for column, high in (("pwatermark", limits.max_watermark), ("punsafe", limits.max_unsafe)):
        if high is not None:
            exps += [gxe.ExpectColumnValuesToNotBeNull(column=column),
                     gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0.0, max_value=high)]
    if limits.min_side is not None:
        exps += [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=limits.min_side) for c in ("width", "height")]
    # 4. Null rate of the optional CLIP similarity, and its range (a cosine).
    exps += [gxe.ExpectColumnValuesToNotBeNull(column="similarity", mostly=1.0 - limits.max_null_rate),
             gxe.ExpectColumnValuesToBeBetween(column="similarity", min_value=-1.0, max_value=1.0)]
    exps.append(gxe.ExpectColumnValueLengthsToBeBetween(
        column="caption", min_value=limits.caption_min_chars, max_value=limits.caption_max_chars))
    return exps


def shard_reads(checked_rows: int, lost: dict[str, int]) -> pa.Table:
    """One row per row that reached the shard read: `lost_in_shard` names the shard (and where it
    broke) that lost it, null when its shard was read. `lost`: that label -> rows lost."""
    labels = [label for label, n in lost.items() for _ in range(n)]
    nulls = pa.nulls(max(checked_rows - len(labels), 0), pa.string())
    return pa.table({"lost_in_shard": pa.concat_arrays([nulls, pa.array(labels, pa.string())])})


def _shard_suite(limits: GateLimits) -> list[Any]:
    import great_expectations.expectations as gxe

    # 5. Rows lost to unreadable shards: a corrupt tar must not pass as a few missing images.
    return [gxe.ExpectColumnValuesToBeNull(column="lost_in_shard", mostly=1.0 - limits.max_unreadable_rate)]


def run_manifest_gate(manifest: pa.Table, limits: GateLimits, workdir: str | Path | None = None,
                      reads: pa.Table | None = None) -> GateResult:
    """Validate `manifest` with GX (and `reads`, from `shard_reads`, against
    `max_unreadable_rate`); build data docs under `workdir` (a temp dir if None)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no telemetry calls from CI
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lcmlora-gx-"))
    context = gx.get_context(mode="file", project_root_dir=str(root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("curated")

    def validate(name: str, expectations: list[Any], table: pa.Table) -> dict[str, Any]:
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=f"curated_{name}"))
        for expectation in expectations:
            suite.add_expectation(expectation)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"curated_{name}", data=batch, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"curated_{name}", validation_definitions=[validation],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")], result_format="SUMMARY"))
        return checkpoint.run(batch_parameters={"dataframe": table.to_pandas()}).describe_dict()

    description = validate("manifest", _suite(limits), manifest)
    if reads is not None:
        more = validate("shard_reads", _shard_suite(limits), reads)
        description["success"] = bool(description["success"] and more["success"])
        description["validation_results"] = description["validation_results"] + more["validation_results"]
    docs = root / "gx" / "uncommitted" / "data_docs" / "local_site"
    return GateResult(success=bool(description["success"]), description=description, docs_dir=docs)


def failure_message(description: dict[str, Any], where: str) -> str:
    """Every failed expectation, in GX's own words (type, kwargs, result)."""
    failed = [e for v in description.get("validation_results", []) for e in v.get("expectations", [])
              if not e.get("success")]
    lines = [f"{where}: the curated manifest failed {len(failed)} expectation(s) of the data-quality gate:"]
    for e in failed:
        kwargs = {k: v for k, v in e.get("kwargs", {}).items() if k != "batch_id"}
        result = {k: v for k, v in e.get("result", {}).items()
                  if k in ("observed_value", "unexpected_count", "unexpected_percent", "partial_unexpected_list",
                           "details")}
        lines.append(f"  - {e['expectation_type']} {json.dumps(kwargs, default=str)}: {json.dumps(result, default=str)}")
    return "\n".join(lines)
