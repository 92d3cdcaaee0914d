"""Prefect task of the merge stage: style-LoRA variants over the (l1, l2) grid, each evaluated."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from components.config import Params
from components.lora.formats import LORA_WEIGHT_NAME
from components.paths import project_path
from tasks.artifacts import artifact_key
from tasks.caching import key_parameter
from tasks.progress import task_progress


def style_slug(style_file: str) -> str:
    """A registry-safe name for a style LoRA: its folder name (or file stem), lowercase."""
    path = Path(style_file)
    stem = path.parent.name if path.name == LORA_WEIGHT_NAME else path.stem
    return re.sub(r"[^a-z0-9.-]+", "-", stem.lower()).strip("-.") or "style"


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
def merge_variants(cfg: Params, base_name: str, lora_folder: str, style_file: str, output: str, output_rel: str,
                   key: str) -> dict[str, Any]:
    """Runtime-adapter, exact merged, fused (and SVD) variants, evaluated; the best by the rule in params."""
    from components.evaluate.judges import load_judges
    from components.models.base_model import resolve_base
    from components.stages.evaluate import prompts_for
    from components.stages.merge import run_merge

    logger = get_run_logger()
    name, base = resolve_base(cfg, base_name)
    judges = load_judges(cfg.evaluate, base, name)
    progress = task_progress("merge", name, f"style merge variants of {name}")
    result = run_merge(cfg.merge, cfg.evaluate, base_name=name, base=base, lcm_folder=Path(lora_folder),
                       style_file=Path(style_file), output=Path(output), judges=judges,
                       prompts=prompts_for(cfg.evaluate, judges, name, base), resolved_yaml=cfg.to_yaml(),
                       params_digest=cfg.digest(), progress=progress)
    progress.finish()
    paths = result.paths
    selection = result.doc["selection"]
    create_markdown_artifact(key=artifact_key("merge-report", base_name), markdown=Path(paths["report.md"]).read_text(),
                             description=f"style merge variants for {base_name}: "
                             + ("best " + selection["best"]["label"] if selection["passed"] else "no variant passed"))
    create_table_artifact(key=artifact_key("merge-metrics", base_name),
                          table=[{k: v for k, v in row.items() if not isinstance(v, (dict, list))}
                                 for row in result.doc["rows"]],
                          description=f"merge variants of {base_name}")
    best = selection["best"]
    best_folder = f"merged-{best['l1']:g}_{best['l2']:g}" if best else None
    best_row = next((r for r in result.doc["rows"] if best and r["label"] == best["label"]), None)
    if not selection["passed"]:
        logger.warning("%s: no style variant published: %s", base_name, "; ".join(selection["violations"]))
    return {"output": output_rel, "passed": selection["passed"], "violations": selection["violations"],
            "best": best, "best_folder": best_folder,
            "best_metrics": {k: v for k, v in (best_row or {}).items() if not isinstance(v, (dict, list))},
            "style": style_slug(style_file)}
