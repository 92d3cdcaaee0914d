"""Prefect task of the evaluate stage: sampler matrix, metrics, gate; the report as Prefect artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from components.config import Params
from components.models.base_model import ResolvedBase
from components.storage.storage import Storage
from tasks.artifacts import artifact_key
from tasks.caching import key_parameter
from tasks.progress import task_progress


def publish_report_artifacts(doc: dict[str, Any], markdown: str, base_name: str) -> None:
    """The evaluation's Markdown report and metric table as Prefect artifacts of the current run."""
    from components.evaluate.report import table_rows

    gate = doc["gate"]
    status = "passed" if gate["passed"] else f"FAILED ({len(gate['violations'])} violations)"
    create_markdown_artifact(markdown=markdown, key=artifact_key("evaluate-report", base_name),
                             description=f"LCM-LoRA evaluation of {base_name}: gate {status}")
    create_table_artifact(table=table_rows(doc), key=artifact_key("evaluate-metrics", base_name),
                          description=f"sampler matrix metrics for {base_name}")


@task(name="evaluate", cache_key_fn=key_parameter, persist_result=True)
def evaluate_lora(cfg: Params, base: ResolvedBase, lora_rel: str, key: str) -> dict[str, Any]:
    """Evaluate the distilled LoRA at `lora_rel` (the distill flow's output) into `stages/evaluate/BASE/KEY/`
    (metrics.json, report, judged copy).

    Returns the gate, so the calling flow can stop before publishing a failed LoRA.
    """
    from components.stages.evaluate import evaluate_stage
    from components.storage.folder_sync import pull_folder

    logger = get_run_logger()
    storage = Storage.from_config(cfg.storage)
    progress = task_progress("evaluate", base.name, f"evaluation of {base.name}")
    stage = evaluate_stage(cfg, base, storage, lora=pull_folder(storage, lora_rel), key=key, progress=progress)
    progress.finish()
    out = stage.evaluation
    publish_report_artifacts(out.doc, Path(out.paths["report.md"]).read_text(), base.name)
    for violation in out.violations:
        logger.warning("gate violation: %s", violation)
    return {"passed": out.passed, "violations": list(out.violations), "metrics": str(out.paths["metrics.json"]),
            "report": str(out.paths["report.html"]), "output": stage.rel, "lora": str(stage.lora_folder)}
