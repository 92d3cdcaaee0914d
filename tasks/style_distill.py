"""Prefect task of the style-distill stage: an LCM-LoRA for base + style where the merge lost the style."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger

from components.config import Params
from components.models.base_model import ResolvedBase
from components.stages.inputs import lora_sha256
from components.storage.storage import Storage
from tasks.artifacts import artifact_key
from tasks.caching import key_parameter
from tasks.progress import task_progress


@task(name="style-distill", cache_key_fn=key_parameter, persist_result=True)
def distill_style_variant(cfg: Params, base: ResolvedBase, style_file: str, merge_rel: str | None,
                          key: str) -> dict[str, Any]:
    """Distill, evaluate and measure the style variant into `stages/style_distill/BASE/KEY/`.

    `merge_rel` is the merge stage's folder: its merged rows go beside this one in the report.
    """
    from components.stages.style_distill import VARIANT_LORA, style_distill_stage, style_slug

    storage = Storage.from_config(cfg.storage)
    merge_doc = json.loads(storage.read_text(f"{merge_rel}/metrics.json")) if merge_rel else None
    progress = task_progress("style-distill", base.name, f"LCM-LoRA distilled for {base.name} + {Path(style_file).name}")
    out = style_distill_stage(cfg, base, storage, style=style_file, merge_doc=merge_doc, key=key, progress=progress)
    progress.finish()
    create_markdown_artifact(key=artifact_key("style-distill-report", base.name),
                             markdown=(out.folder / "report.md").read_text(),
                             description=f"style variant of {base.name} distilled for the style model: gate "
                             + ("passed" if out.passed else "FAILED"))
    for violation in out.violations:
        get_run_logger().warning("style variant gate violation: %s", violation)
    return {"output": out.rel, "lora_subdir": VARIANT_LORA, "passed": out.passed, "violations": list(out.violations),
            "metrics": {k: v for k, v in out.row.items() if not isinstance(v, (dict, list))},
            "weights_sha256": lora_sha256(out.lora_folder), "style": style_slug(style_file),
            "fused": out.fused.name, "seconds": round(out.seconds, 1)}
