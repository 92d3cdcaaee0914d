"""Prefect tasks of the curate stage: source writers, the source fingerprint, curation."""

from __future__ import annotations

import json
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from components.config import Params
from components.plugins import installed, load_plugin
from components.stages.curate import curate_stage
from components.stages.inputs import source_digest
from components.storage.storage import Storage
from tasks.caching import key_parameter, storage_retries
from tasks.progress import task_progress

SOURCES = "lcmlora.sources"  # entry-point group of the source writers (the toy worlds register theirs)


@task(name="source-writers")
def ensure_source(cfg: Params) -> str | None:
    """Let each installed source writer write `curate.source` when it is that writer's folder and empty.

    Production never imports a writer: the toy worlds plug in through the `lcmlora.sources` entry
    points, and each writer answers None for a folder that is not its own.
    """
    for name in installed(SOURCES):
        summary = load_plugin(SOURCES, name, "orchestrate.toy_source_if_missing")(cfg)
        if summary is not None:
            get_run_logger().info("wrote the %s source: %s rows in %s shards at %s", name, summary["rows"],
                                  len(summary["shards"]), summary["output"])
            return summary["output"]
    return None


@task(name="fingerprint-source", **storage_retries())
def fingerprint_source(cfg: Params) -> str:
    """Content digest of the whole source tree (metadata and shards)."""
    return source_digest(cfg)


@task(name="curate", cache_key_fn=key_parameter, persist_result=True)
def curate_manifest(cfg: Params, min_side: int, key: str) -> dict[str, Any]:
    """Curate the source into `stages/curate/KEY/` (manifest, rejections, GX data docs).

    A curation already stored there (by `lcmlora curate`, or a run whose cache record is gone) is reused.
    """
    from prefect.runtime import flow_run

    storage = Storage.from_config(cfg.storage)
    progress = task_progress("curate", str(min_side), f"curation of {cfg.curate.source}")
    # The keyed folder's claim names the flow run: a retried run (same id) resumes its own claim.
    result = curate_stage(cfg, storage, min_side=min_side, key=key, progress=progress,
                          claim_owner=f"flow-run-{flow_run.id}" if flow_run.id else None)
    progress.finish()
    summary = result.as_dict()
    if result.reused:
        get_run_logger().info("reused the curated manifest at %s", storage.url(result.manifest))
        return summary
    create_table_artifact(
        key="curate-rejections",
        table=[{"reason": r, "rows": n} for r, n in sorted(result.rejected.items())] + [{"reason": "kept", "rows": result.kept}],
        description=f"Curation of {cfg.curate.source}: {result.kept} of {result.rows_in} rows kept",
    )
    create_markdown_artifact(
        key="curate-summary",
        markdown=f"# Curated manifest\n\n`{storage.url(result.manifest)}`, hash `{result.manifest_hash[:16]}`\n\n"
        f"```json\n{json.dumps(summary, indent=1)}\n```\n",
    )
    return summary
