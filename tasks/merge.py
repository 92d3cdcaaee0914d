"""Prefect task of the merge stage: style-LoRA variants over the (l1, l2) grid, each evaluated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from components.config import Params
from components.models.base_model import ResolvedBase
from components.paths import project_path
from components.stages.style_distill import style_slug
from components.storage.storage import Storage
from tasks.artifacts import artifact_key
from tasks.caching import key_parameter
from tasks.progress import task_progress


@task(name="style-lora")
def find_style_lora(cfg: Params, base_name: str) -> str | None:
    """The style LoRA file of `merge.style_file`, or None (logged) when there is none to merge."""
    style = project_path(cfg.merge.style_file)
    if style.is_file():
        return str(style)
    get_run_logger().warning("%s: merge not run: no style LoRA at %s (merge.style_file); "
                             "train the toy one with `lcmlora toy style-lora`", base_name, style)
    return None


@task(name="merge", cache_key_fn=key_parameter, persist_result=True)
def merge_variants(cfg: Params, base: ResolvedBase, style_file: str, lora_rel: str, key: str) -> dict[str, Any]:
    """Runtime-adapter, exact merged, fused (and SVD) variants of the base's distilled LoRA, evaluated;
    the best by the rule in params, stored in `stages/merge/BASE/KEY/`."""
    from components.stages.merge import merge_stage
    from components.storage.folder_sync import pull_folder

    storage = Storage.from_config(cfg.storage)
    progress = task_progress("merge", base.name, f"style merge variants of {base.name}")
    stage = merge_stage(cfg, base, storage, lcm=pull_folder(storage, lora_rel), style=Path(style_file), key=key,
                        progress=progress)
    progress.finish()
    result = stage.merge
    selection = result.selection
    create_markdown_artifact(key=artifact_key("merge-report", base.name),
                             markdown=Path(result.paths["report.md"]).read_text(),
                             description=f"style merge variants for {base.name}: "
                             + ("best " + selection["best"]["label"] if selection["passed"] else "no variant passed"))
    create_table_artifact(key=artifact_key("merge-metrics", base.name),
                          table=[{k: v for k, v in row.items() if not isinstance(v, (dict, list))}
                                 for row in result.doc["rows"]],
                          description=f"merge variants of {base.name}")
    best = selection["best"]
    best_row = next((r for r in result.doc["rows"] if best and r["label"] == best["label"]), None)
    if not selection["passed"]:
        get_run_logger().warning("%s: no style variant published: %s", base.name, "; ".join(selection["violations"]))
    return {"output": stage.rel, "passed": selection["passed"], "violations": selection["violations"],
            "best": best, "best_folder": result.best_folder.name if result.best_folder else None,
            "best_metrics": {k: v for k, v in (best_row or {}).items() if not isinstance(v, (dict, list))},
            "style": style_slug(style_file), "style_lost": bool(selection.get("style_lost"))}
