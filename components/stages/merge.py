"""The merge stage: one LCM-LoRA and one style LoRA -> evaluated variants and contract-4 folders.

theta' = theta_pre + l1 * tau_style + l2 * tau_LCM (LCM-LoRA report, Section 3.2, eq. 4),
over the `merge.weights` grid. The runner loads the base twice (one copy carries adapters, the
other fused deltas), evaluates every variant (`components/evaluate/merge_eval.py`), completes each
`merged-L1_L2` folder as a contract-4 LoRA folder and writes the report. The CLI, the Prefect
task and the toy reproduction call `run_merge` and nothing else.

Judges and prompts come from the caller: production evaluation gets its judges from the base's
provider, the toy world plugs in its digit judges and style scorer the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import RESOLVED_CONFIG_NAME, BaseConfig, EvaluateConfig, MergeConfig
from components.evaluate.merge_eval import (
    MergeResult,
    evaluate_merge,
    markdown_table,
    write_merge_report,
)
from components.lineage import collect, portable_yaml, utc_now, write_lineage
from components.lora.io import lora_file
from components.lora.model_card import render_model_card
from components.progress import ProgressFn
from components.storage.atomic_dir import atomic_dir
from components.storage.content_hash import file_sha256

# What a previous merge left in its output folder; a folder holding anything else is never replaced.
OWNS = ("merged-*", "fused-*", "svd*-*", "*.md", "*.json", "*.png", "*.html", "*.csv")
CARD_TAGS = ("lora", "lcm", "lcm-lora", "style", "text-to-image", "stable-diffusion", "diffusers")


@dataclass(frozen=True)
class MergeOutput:
    """What the merge stage produced: its folder, the metrics document and the report files."""

    output: Path  # holds merged-L1_L2/ (contract-4 folders), fused checkpoints, report files
    doc: dict[str, Any]  # metrics.json: rows, selection, files, info, config
    paths: dict[str, Path]  # report.md, metrics.json, grid.png

    @property
    def selection(self) -> dict[str, Any]:
        return self.doc["selection"]

    @property
    def passed(self) -> bool:
        """True when some (l1, l2) passes the selection rule."""
        return bool(self.selection["passed"])

    @property
    def best_folder(self) -> Path | None:
        """The selected `merged-L1_L2` folder, or None when no row passes."""
        best = self.selection["best"]
        return None if best is None else self.output / f"merged-{best['l1']:g}_{best['l2']:g}"


def run_merge(cfg: MergeConfig, evaluate_cfg: EvaluateConfig, *, base_name: str, base: BaseConfig,
              lcm_folder: Path, style_file: Path, output: Path, judges: Any, prompts: list[str],
              resolved_yaml: str, params_digest: str, progress: ProgressFn | None = None) -> MergeOutput:
    """Evaluate every merge variant over the grid, complete the merged folders, write the report.

    `judges` (components/evaluate/judges.py) gives the FD backbone, adherence scorer and optional style
    scorer; `evaluate_cfg.device` is where sampling and metrics run. `resolved_yaml` and
    `params_digest` are the resolved params, recorded in every merged folder.
    """
    from components.models.base_model import load_base
    from components.paths import project_path

    t0 = time.perf_counter()
    started_at = utc_now()
    style_path, lcm_path = lora_file(project_path(style_file)), lora_file(project_path(lcm_folder))
    # 1. Two copies of the base: one carries adapters, the other fused deltas.
    reference = str(project_path(base.reference))
    loaded = load_base(reference, family=base.family)
    fused = load_base(reference, family=base.family)
    device = evaluate_cfg.device
    base_meta = {"name": base_name, "family": base.family, "resolution": base.resolution,
                 "reference": base.reference, "fingerprint": loaded.fingerprint}
    # 2. Every variant over the grid, sampled and measured, written into a staging folder that
    #    becomes `output` when everything is there (`components/storage/atomic_dir.py`).
    output = Path(output)
    with atomic_dir(output, owns=OWNS) as staging:
        result = evaluate_merge(loaded.pipe.to(device), fused.pipe.to(device), base.family, style_path, lcm_path,
                                cfg, judges, prompts, teacher_guidance=base.guidance_scale,
                                resolution=base.resolution, output=staging, base_meta=base_meta, progress=progress)
        result.doc["base"] = base_name
        result.doc["base_fingerprint"] = loaded.fingerprint
        result.doc["seconds"] = round(time.perf_counter() - t0, 1)
        result.doc["files"] = relocated(result.doc["files"], staging, output)
        # 3. Contract-4 folders and the report.
        finalize_merged_folders(result, staging, cfg, base_reference=base.reference, started_at=started_at,
                                resolved_yaml=resolved_yaml, params_digest=params_digest, hub_id=base.hub_id,
                                license=base.license)
        written = write_merge_report(result, staging)
    paths = {name: output / path.relative_to(staging) for name, path in written.items()}
    return MergeOutput(output=output, doc=result.doc, paths=paths)


def relocated(files: Any, staging: Path, output: Path) -> Any:
    """`files` (nested dicts of path strings) with paths under `staging` moved to `output`."""
    if isinstance(files, dict):
        return {k: relocated(v, staging, output) for k, v in files.items()}
    if isinstance(files, str) and Path(files).is_relative_to(staging):
        return str(output / Path(files).relative_to(staging))
    return files


def finalize_merged_folders(result: MergeResult, output: Path, cfg: MergeConfig, *, base_reference: str,
                            started_at: str, resolved_yaml: str, params_digest: str, hub_id: str | None = None,
                            license: str | None = None) -> None:
    """Complete each `merged-L1_L2` folder as a contract-4 LoRA folder: README.md model card,
    metrics.json (its rows and a `gate` from the selection rule), lineage.json, resolved params."""
    doc = result.doc
    for name in [n for n in doc["files"] if n.startswith("merged-")]:
        folder = output / name
        rows = [r for r in doc["rows"] if r["variant"] != "reference" and r["variant"] != "context"
                and f"merged-{r['l1']:g}_{r['l2']:g}" == name]
        merged_row = next(r for r in rows if r["variant"] == "merged")
        violations = [v for v in doc["selection"]["violations"] if v.startswith(merged_row["label"] + ":")]
        best = doc["selection"]["best"]
        gate = {"passed": not violations, "violations": violations, "rule": doc["selection"]["rule"],
                "selected": best is not None and best["label"] == merged_row["label"]}
        metrics = {"rows": rows, "reference": doc["rows"][0], "info": doc["info"], "gate": gate}
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        body = (f"\nStyle LoRA `{Path(doc['style']).name}` x {merged_row['l1']:g} + LCM-LoRA x "
                f"{merged_row['l2']:g}, merged exactly (ranks concatenated; theta' = theta_pre + l1 tau_style "
                "+ l2 tau_LCM, LCM-LoRA report Section 3.2).\n\n" + markdown_table(rows) + "\n")
        card = render_model_card(base_model=base_reference, title=name, tags=CARD_TAGS,
                                 num_inference_steps=cfg.lcm_steps, guidance_scale=cfg.lcm_guidance_scale,
                                 body=body, extra={"merge": {"l1": merged_row["l1"], "l2": merged_row["l2"]}},
                                 relation="merge", hub_id=hub_id, license=license)
        (folder / "README.md").write_text(card)
        (folder / RESOLVED_CONFIG_NAME).write_text(portable_yaml(resolved_yaml))
        write_lineage(folder, collect(
            stage="merge", params_digest=params_digest, started_at=started_at,
            inputs={"style": {"path": doc["style"], "sha256": file_sha256(doc["style"])},
                    "lcm": {"path": doc["lcm"], "sha256": file_sha256(doc["lcm"])}},
            extra={"base": {"name": doc.get("base"), "reference": base_reference,
                            "fingerprint": doc.get("base_fingerprint")},
                   "weights": {"l1": merged_row["l1"], "l2": merged_row["l2"]}}))
