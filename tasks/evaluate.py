"""Prefect task of the evaluate stage: sampler matrix, metrics, gate; the report as Prefect artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from components.config import Params
from tasks.artifacts import artifact_key
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


@task(name="evaluate")
def evaluate_lora(cfg: Params, base_name: str, lora_folder: str, output: str) -> dict[str, Any]:
    """Evaluate one LoRA folder against its base; metrics.json and report land in `output` and the
    LoRA folder. Returns the gate, so the calling flow can stop before publishing a failed LoRA."""
    from components.models.base_model import resolve_base
    from components.stages.evaluate import run_evaluate

    logger = get_run_logger()
    name, base = resolve_base(cfg, base_name)
    progress = task_progress("evaluate", name, f"evaluation of {name}")
    out = run_evaluate(cfg.evaluate, base_name=name, base=base, lora_folder=Path(lora_folder),
                       output=Path(output), progress=progress)
    progress.finish()
    publish_report_artifacts(out.doc, Path(out.paths["report.md"]).read_text(), name)
    for violation in out.violations:
        logger.warning("gate violation: %s", violation)
    return {"passed": out.passed, "violations": list(out.violations), "metrics": str(out.paths["metrics.json"]),
            "report": str(out.paths["report.html"]), "output": str(Path(out.paths["metrics.json"]).parent),
            "lora": str(lora_folder)}
