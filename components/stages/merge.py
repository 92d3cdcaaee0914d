"""The merge stage: one LCM-LoRA and one style LoRA -> evaluated variants and contract-4 folders.

theta' = theta_pre + l1 * tau_style + l2 * tau_LCM (LCM-LoRA report, Section 3.2, eq. 4),
over the `merge.weights` grid.

    output = merge_stage(params, base, storage)   # base: a ResolvedBase; the one call of every caller

`merge_stage` finds the LCM-LoRA by key (or takes the folder given) and the style LoRA
(`merge.style_file`), works in the keyed folder `stages/merge/BASE/KEY` (or `output`) and stores
it. `run_merge` uses the base twice (one copy carries adapters, the other fused deltas),
evaluates every variant (`components/evaluate/merge_eval.py`), completes each `merged-L1_L2`
folder as a contract-4 LoRA folder and writes the report. Judges and prompts are the base's
(its provider, `bases.NAME.judges`; the toy worlds plug in theirs the same way).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import RESOLVED_CONFIG_NAME, EvaluateConfig, MergeConfig, Params
from components.evaluate.merge_eval import (
    MergeResult,
    evaluate_merge,
    markdown_table,
    write_merge_report,
)
from components.lineage import collect, portable_yaml, utc_now, write_lineage
from components.lora.io import lora_file
from components.lora.model_card import render_model_card
from components.models.base_model import ResolvedBase, load_base
from components.paths import project_path
from components.progress import ProgressFn
from components.stages.evaluate import prompts_for
from components.stages.inputs import distilled_lora, merge_rel
from components.stages.keys import output_rel
from components.storage.atomic_dir import atomic_dir
from components.storage.content_hash import file_sha256
from components.storage.folder_sync import pull_folder, push_folder, work_dir
from components.storage.storage import Storage

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


def run_merge(cfg: MergeConfig, evaluate_cfg: EvaluateConfig, *, base: ResolvedBase, lcm_folder: Path,
              style_file: Path, output: Path, resolved_yaml: str, params_digest: str, judges: Any = None,
              prompts: list[str] | None = None, progress: ProgressFn | None = None) -> MergeOutput:
    """Evaluate every merge variant over the grid, complete the merged folders, write the report.

    `judges` (components/evaluate/judges.py: FD backbone, adherence scorer, optional style scorer)
    and `prompts` default to the base's; `evaluate_cfg.device` is where sampling and metrics run.
    `resolved_yaml` and `params_digest` are the resolved params, recorded in every merged folder.
    """
    from components.evaluate.judges import load_judges

    t0 = time.perf_counter()
    started_at = utc_now()
    style_path, lcm_path = lora_file(project_path(style_file)), lora_file(project_path(lcm_folder))
    # 1. Judges and prompts first: a missing backbone fails before any sampling.
    judges = judges if judges is not None else load_judges(evaluate_cfg, base.config, base.name)
    prompts = prompts if prompts is not None else prompts_for(evaluate_cfg, judges, base.name, base.config)
    # 2. Two copies of the base: one carries adapters, the other fused deltas.
    config = base.config
    loaded = base.load()
    fused = load_base(str(project_path(config.reference)), family=config.family)
    device = evaluate_cfg.device
    base_meta = {"name": base.name, "family": config.family, "resolution": config.resolution,
                 "reference": config.reference, "fingerprint": base.fingerprint}
    # 3. Every variant over the grid, sampled and measured, written into a staging folder that
    #    becomes `output` when everything is there (`components/storage/atomic_dir.py`).
    output = Path(output)
    with atomic_dir(output, owns=OWNS) as staging:
        result = evaluate_merge(loaded.pipe.to(device), fused.pipe.to(device), config.family, style_path, lcm_path,
                                cfg, judges, prompts, teacher_guidance=config.guidance_scale,
                                resolution=config.resolution, output=staging, base_meta=base_meta, progress=progress)
        result.doc["base"] = base.name
        result.doc["base_fingerprint"] = base.fingerprint
        result.doc["seconds"] = round(time.perf_counter() - t0, 1)
        result.doc["files"] = relocated(result.doc["files"], staging, output)
        # 4. Contract-4 folders and the report.
        finalize_merged_folders(result, staging, cfg, base_reference=config.reference, started_at=started_at,
                                resolved_yaml=resolved_yaml, params_digest=params_digest, hub_id=config.hub_id,
                                license=config.license)
        written = write_merge_report(result, staging)
    paths = {name: output / path.relative_to(staging) for name, path in written.items()}
    return MergeOutput(output=output, doc=result.doc, paths=paths)


@dataclass(frozen=True)
class MergeStageOutput:
    """What the merge stage did: the variants, and where they are kept."""

    merge: MergeOutput
    rel: str | None  # stages/merge/BASE/KEY below storage.root (None with an explicit output folder)
    style_file: Path  # the style LoRA it merged


def merge_stage(params: Params, base: ResolvedBase, storage: Storage, *, lcm: Path | None = None,
                style: Path | None = None, output: Path | None = None, key: str | None = None,
                judges: Any = None, progress: ProgressFn | None = None) -> MergeStageOutput:
    """The merge stage's one call: an LCM-LoRA and a style LoRA -> evaluated variants, stored under their key.

    `lcm` (a local LoRA folder) defaults to the distill stage's output of these params, `style`
    to `merge.style_file`. The variants go to `output`, else to the keyed folder
    `stages/merge/BASE/KEY` (`key` when the caller has computed it).
    """
    # 1. The two LoRAs, and the folder the variants are written in.
    style_file = project_path(style or params.merge.style_file)
    lcm_dir = Path(lcm) if lcm is not None else pull_folder(storage, distilled_lora(params, storage, base))
    if output is not None:
        rel, folder = None, Path(output)
    else:
        rel = output_rel("merge", key, base.name) if key else merge_rel(params, base, lcm_dir, style_file)
        folder = work_dir(storage, rel)
    # 2. Every variant evaluated, then the folder stored under its key.
    result = run_merge(params.merge, params.evaluate, base=base, lcm_folder=lcm_dir, style_file=style_file,
                       output=folder, resolved_yaml=params.to_yaml(), params_digest=params.digest(), judges=judges,
                       progress=progress)
    if rel:
        push_folder(storage, folder, rel)
    return MergeStageOutput(result, rel, Path(style_file))


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
