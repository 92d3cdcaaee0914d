"""Prefect task of the synthesize stage: a base's own samples as a LAION-format source."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from components.config import Params
from components.models.base_model import ResolvedBase
from components.stages.synthesize import synthesize_stage
from components.storage.storage import Storage
from tasks.caching import storage_retries
from tasks.progress import task_progress


@task(name="synthesize", **storage_retries())
def synthesize_source(cfg: Params, base: ResolvedBase) -> dict[str, Any]:
    """Sample the base into `stages/synthesize/BASE/KEY` (a complete source of that key is reused, not sampled)."""
    storage = Storage.from_config(cfg.storage)
    progress = task_progress("synthesize", base.name, f"samples of {base.name} as its distillation source")
    # The keyed folder's claim names the flow run: a retried run (same id) resumes its own batches.
    out = synthesize_stage(cfg, base, storage, progress=progress,
                           claim_owner=f"flow-run-{flow_run.id}" if flow_run.id else None)
    progress.finish()
    get_run_logger().info("%s %d samples of %s at %s", "reused" if out.reused else "wrote", out.count, base.name,
                          storage.url(out.source))
    return {**out.as_dict(), "skipped": out.reused, "source_url": storage.url(out.source)}
