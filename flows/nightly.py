"""The nightly flow: every base in params.yaml through every stage, skipping unchanged work.

Two ways to run the bases, same stages, same summary:

- **fanned out** (the nightly runs from a deployment and the `base-pipeline` deployment exists,
  `orchestrate.fan_out: auto`): one run of that deployment per base, submitted together with
  `run_deployment` to its work pool; the deployment's Prefect concurrency limit
  (`orchestrate.max_parallel_bases`) bounds how many run at a time. A base run that crashes (its
  worker died) is put back to AwaitingRetry, up to `orchestrate.base_retries` times; the next
  worker resumes its distillation from the last checkpoint in the keyed folder.
- **in-process** (`lcmlora nightly` without a server, the README's main command): each base in
  its own `base-pipeline` subflow, one after another.

Either way one failing base does not stop the others; the nightly then ends failed, naming the
bases that failed. A stage whose cache key (content fingerprints + its params section) is
unchanged is served from the Prefect cache under the storage root, so a second run with nothing
changed trains nothing and says so.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from components.config import Params, load_params
from components.preflight import preflight
from components.run_summary import summary_markdown, verdict
from flows.pipeline import base_pipeline
from tasks.caching import storage_retries
from tasks.curate import ensure_source
from tasks.dvc import dvc_push
from tasks.fanout import base_deployment, fan_out
from tasks.runtime import set_torch_threads


class BasesFailed(RuntimeError):
    """Some bases failed; `summary` holds what every base did."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@flow(name="nightly")
def nightly(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Every base in params.yaml: curate, encode, distill, evaluate (gate), merge, publish."""
    cfg: Params = load_params(params_file, overrides)
    if not cfg.bases:
        raise ValueError(f"{params_file}: no bases to run (add one under `bases:`)")

    # 1. Every stage's inputs and settings for every base, checked before anything runs; then the
    #    process, then the toy source, written on first use so a fresh clone runs end to end.
    preflight(cfg)
    set_torch_threads(cfg.orchestrate.torch_threads)
    if cfg.orchestrate.toy_source_if_missing:
        ensure_source(cfg)

    # 2. Each base independently: fanned out to the base deployment's pool, or in-process in order.
    deployment = base_deployment(cfg)
    bases = fan_out(cfg, deployment) if deployment else in_process(cfg)
    summary: dict[str, Any] = {"bases": bases}

    # 3. Data versions to the DVC remote (serialized with any other flow's DVC calls).
    if cfg.orchestrate.dvc_push:
        dvc_push.with_options(**storage_retries(cfg.orchestrate.retries, cfg.orchestrate.retry_delay_s))(".")

    # 4. The report, then fail if any base failed.
    summary["verdict"] = verdict(summary)
    create_markdown_artifact(key="nightly-summary", markdown=summary_markdown(summary),
                             description="What the nightly ran, skipped and published")
    get_run_logger().info(summary["verdict"])
    failed = [n for n, b in summary["bases"].items() if b["status"] == "failed"]
    if failed:
        raise BasesFailed(f"{len(failed)} of {len(cfg.bases)} bases failed: {', '.join(failed)}", summary)
    return summary


def in_process(cfg: Params) -> dict[str, dict[str, Any]]:
    """Every base in a `base-pipeline` subflow of this process, in order; a failure is recorded."""
    bases: dict[str, dict[str, Any]] = {}
    for name, base in cfg.bases.items():
        state = base_pipeline.with_options(flow_run_name=f"base-{name}")(cfg, name, base, return_state=True)
        if state.is_completed():
            bases[name] = {"status": "completed", **state.result()}
        else:
            error = state.result(raise_on_failure=False)
            bases[name] = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    return bases
