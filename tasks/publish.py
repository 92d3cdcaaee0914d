"""Prefect tasks of the publish stage: base registration and registry publication."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from components.config import Params
from components.models.base_model import ResolvedBase
from components.stages.publish import publish_stage
from components.stages.register import record_base
from components.storage.storage import Storage
from tasks.artifacts import artifact_key
from tasks.caching import key_parameter, storage_retries


class GateFailed(RuntimeError):
    """The evaluation gate failed: nothing is published. Lists every violation."""

    def __init__(self, base_name: str, violations: list[str]):
        listed = "; ".join(violations) or "no violations recorded"
        super().__init__(f"{base_name}: evaluation gate failed, nothing published ({len(violations)} violations: {listed})")
        self.violations = violations


@task(name="gate")
def enforce_gate(base_name: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Fail (closed) when the evaluation gate did not pass, listing every violation."""
    if evaluation.get("passed") is not True:
        raise GateFailed(base_name, list(evaluation.get("violations") or []))
    return {"passed": True}


@task(name="register-base", **storage_retries())
def register_base(cfg: Params, base: ResolvedBase, parent: str | None) -> dict[str, Any]:
    """Record the base (reference, family, fingerprints, parent) under `bases/NAME/UNET_FP.json`."""
    return record_base(Storage.from_config(cfg.storage), base, parent)


@task(name="publish", cache_key_fn=key_parameter, persist_result=True, **storage_retries())
def publish_folder(cfg: Params, base_name: str, folder_rel: str, name: str, key: str, subdir: str = "",
                   gate: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish a gated artifact folder (`folder_rel/subdir`) as a new registry version; move `publish.alias`.

    `gate` and `metrics` default to the folder's metrics.json (the registry refuses a failed gate).
    """
    published = publish_stage(cfg, Storage.from_config(cfg.storage), folder_rel=folder_rel, subdir=subdir,
                              name=name, gate=gate, metrics=metrics)
    get_run_logger().info("%s %s (%s) for base %s; pull it with: %s",
                          "already published as" if published.existing else "published", published.reference,
                          published.digest, base_name, published.pull)
    create_markdown_artifact(
        key=artifact_key("publish", name),
        markdown=f"# Published {published.reference}\n\nRegistry `{published.registry}`, alias "
        f"`{published.alias}`, base `{base_name}`.\n\n```bash\n{published.pull}\n```\n",
    )
    return published.as_dict()
