"""Prefect tasks around DVC: serialized per repository (components/dvc_runner.py)."""

from __future__ import annotations

from prefect import task
from prefect.logging import get_run_logger

from components.dvc_runner import run_dvc
from tasks.caching import storage_retries


@task(name="dvc-push", **storage_retries())
def dvc_push(repo: str = ".") -> str:
    """Push DVC-tracked data and the pipeline's cached outputs to the default remote."""
    out = run_dvc(["push"], repo)
    get_run_logger().info("dvc push: %s", out.strip().splitlines()[-1] if out.strip() else "nothing to push")
    return out
