"""Fanning the nightly's bases out to the `base-pipeline` deployment's work pool, and waiting.

The nightly flow only wires: `base_deployment` says whether to fan out, `fan_out` submits one
`run_deployment` per base under the deployment's Prefect concurrency limit and waits for all
(`wait_for_runs`: a Running run without heartbeats for `orchestrate.base_heartbeat_timeout_s` is
marked Crashed; a crashed run is put back to AwaitingRetry up to `orchestrate.base_retries`
times, and its distillation resumes from the checkpoints in its keyed folder).
"""

from __future__ import annotations

import json
import time
from datetime import UTC
from typing import Any
from uuid import UUID

from prefect.logging import get_run_logger

from components.config import Params
from components.stages.keys import STAGE_OUTPUTS
from components.storage.storage import Storage


def base_deployment(cfg: Params) -> Any | None:
    """The deployment to fan out to, or None to run the bases in-process (see the module docstring)."""
    from prefect.context import FlowRunContext
    from prefect.exceptions import ObjectNotFound

    mode = cfg.orchestrate.fan_out
    if mode == "in-process":
        return None
    ctx = FlowRunContext.get()
    if mode == "auto" and (ctx is None or ctx.flow_run is None or ctx.flow_run.deployment_id is None):
        return None  # `lcmlora nightly` on this machine: no pool to fan out to
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(cfg.orchestrate.base_deployment)
        except ObjectNotFound:
            if mode == "deployment":
                raise
            get_run_logger().warning("no %s deployment: running the bases in-process",
                                     cfg.orchestrate.base_deployment)
            return None


def fan_out(cfg: Params, deployment: Any) -> dict[str, dict[str, Any]]:
    """One base-deployment run per base, bounded by the deployment's concurrency limit; wait for all."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.context import FlowRunContext
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    limit = cfg.orchestrate.max_parallel_bases
    with get_client(sync_client=True) as client:
        # 1. The bound: a Prefect deployment concurrency limit (excess runs wait AwaitingConcurrencySlot).
        if deployment.global_concurrency_limit is None or deployment.global_concurrency_limit.limit != limit:
            client.update_deployment(deployment.id, DeploymentUpdate(concurrency_limit=limit))
        # 2. Submit every base at once; each writes its summary where this run reads it back.
        nightly_id = FlowRunContext.get().flow_run.id
        runs: dict[str, UUID] = {}
        for name, base in cfg.bases.items():
            report = f"{STAGE_OUTPUTS}/runs/{nightly_id}/{name}.json"
            run = run_deployment(deployment.id, timeout=0, flow_run_name=f"base-{name}", parameters={
                "cfg": cfg.model_dump(mode="json"), "base_name": name, "base": base.model_dump(mode="json"),
                "report_rel": report})
            runs[name] = run.id
            logger.info("%s: submitted %s run %s (at most %d at a time)", name, cfg.orchestrate.base_deployment,
                        run.id, limit)
        # 3. Wait for all; crashed runs (worker lost) go back to AwaitingRetry.
        final = wait_for_runs(client, runs, cfg.orchestrate.base_retries, cfg.orchestrate.base_poll_s,
                              cfg.orchestrate.base_heartbeat_timeout_s)
    storage = Storage.from_config(cfg.storage)
    bases: dict[str, dict[str, Any]] = {}
    for name, run in final.items():
        report = f"{STAGE_OUTPUTS}/runs/{nightly_id}/{name}.json"
        if run.state.is_completed() and storage.exists(report):
            bases[name] = {"status": "completed", "flow_run": str(run.id), **json.loads(storage.read_text(report))}
        else:
            bases[name] = {"status": "failed", "flow_run": str(run.id), "error": state_error(run.state)}
    return bases


def wait_for_runs(client: Any, runs: dict[str, UUID], retries: int, poll_s: float,
                  heartbeat_timeout_s: float | None = None) -> dict[str, Any]:
    """Poll the base runs until each is final; a crashed one is retried (same run, AwaitingRetry).

    A Running run without a flow-run heartbeat for `heartbeat_timeout_s` (its worker or pod was
    lost and could not report) is marked Crashed first.
    """
    from prefect.states import AwaitingRetry, Crashed

    logger = get_run_logger()
    retried = dict.fromkeys(runs, 0)
    pending, final = dict(runs), {}
    while pending:
        for name, run_id in list(pending.items()):
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_running() and heartbeat_timeout_s:
                silent = seconds_since_heartbeat(client, run)
                if silent > heartbeat_timeout_s:
                    logger.warning("%s: no heartbeat from base run %s for %.0f s: its worker is lost", name,
                                   run_id, silent)
                    client.set_flow_run_state(run_id, Crashed(message=f"no heartbeat for {silent:.0f} s"),
                                              force=True)
                    run = client.read_flow_run(run_id)
            if run.state is None or not run.state.is_final():
                continue
            if run.state.is_crashed() and retried[name] < retries:
                retried[name] += 1
                logger.warning("%s: base run crashed (%s); retry %d of %d resumes from its checkpoints", name,
                               run.state.message, retried[name], retries)
                client.set_flow_run_state(run_id, AwaitingRetry(message=f"lcmlora retry {retried[name]}"),
                                          force=True)
                continue
            final[name] = run
            del pending[name]
        if pending:
            time.sleep(poll_s)
    return final


def seconds_since_heartbeat(client: Any, run: Any) -> float:
    """Seconds since the run's last `prefect.flow-run.heartbeat` event (or since it started running)."""
    from datetime import datetime

    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    since = run.state.timestamp
    page = client.read_events(EventFilter(occurred=EventOccurredFilter(since=since),
                                          event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                                          resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"])), limit=1)
    last = max([since, *(e.occurred for e in page.events)])
    return (datetime.now(UTC) - last).total_seconds()


def state_error(state: Any) -> str:
    """`Type: message` of a failed base run, from its final state (as the in-process path reports it)."""
    message = (state.message or state.name or "").removeprefix("Flow run encountered an exception: ")
    return message if state.is_failed() else f"{state.name}: {message}"
