"""Prefect tasks of the curate stage: the toy source, the source fingerprint, curation."""

from __future__ import annotations

import json
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from components.config import Params
from components.plugins import load_plugin
from components.stages.curate import run_curate, source_storage, stored_output
from components.stages.inputs import source_digest
from components.stages.keys import output_rel
from components.storage.storage import Storage
from tasks.caching import key_parameter, storage_retries
from tasks.progress import task_progress


@task(name="toy-source")
def ensure_toy_source(cfg: Params) -> str | None:
    """Write the toy source when `curate.source` is the toy folder and it is empty; say what happened.

    The toy world plugs in through the `lcmlora.sources` entry point: production never imports it.
    """
    writer = load_plugin("lcmlora.sources", "toy", "orchestrate.toy_source_if_missing")
    summary = writer(cfg)
    if summary is None:
        return None
    get_run_logger().info("wrote the toy source: %s rows in %s shards at %s", summary["rows"],
                          len(summary["shards"]), summary["output"])
    return summary["output"]


@task(name="fingerprint-source", **storage_retries())
def fingerprint_source(cfg: Params) -> str:
    """Content digest of the whole source tree (metadata and shards)."""
    return source_digest(cfg)


@task(name="curate", cache_key_fn=key_parameter, persist_result=True)
def curate_manifest(cfg: Params, min_side: int, key: str) -> dict[str, Any]:
    """Curate the source into `stages/curate/KEY/` (manifest, rejections, GX data docs).

    A curation already stored there (by `lcmlora curate`, or a run whose cache record is gone) is reused.
    """
    storage = Storage.from_config(cfg.storage)
    stored = stored_output(storage, output_rel("curate", key))
    if stored is not None:
        get_run_logger().info("reused the curated manifest at %s", storage.url(stored.manifest))
        return stored.as_dict()
    progress = task_progress("curate", str(min_side), f"curation of {cfg.curate.source}")
    result = run_curate(cfg.curate, source=source_storage(cfg.curate.source, cfg.storage), storage=storage,
                        output=output_rel("curate", key), min_side=min_side, resolved_yaml=cfg.to_yaml(),
                        progress=progress)
    progress.finish()
    summary = result.as_dict()
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
