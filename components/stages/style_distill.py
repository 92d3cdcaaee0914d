"""The style-distill stage: where the training-free merge loses the style, an LCM-LoRA distilled for base + style.

    output = style_distill_stage(params, base, storage, style=style_file)   # the one call of every caller

The merge (theta_pre + l1 tau_style + l2 tau_LCM, no training) can lose a style the LCM-LoRA was never
distilled with. This stage makes the style model its own base instead: the style LoRA fused into the
base at l1 (`synthesize.style_weight`), saved as a diffusers folder `stages/fused/BASE/KEY` and resolved
with its own fingerprints; its own samples (the synthesize stage, DPM-Solver++ at `synthesize.steps`)
go through curate -> encode -> distill unchanged, and the LoRA is evaluated on the fused model with the
base's judges (the same gate as every LCM-LoRA, its teacher being the fused model). Its style retention,
adherence and FD are measured against the merge stage's style reference (`merge_eval.sample_reference`,
same prompts and noise), so its row stands beside the merged rows in `report.md`.

The keyed folder `stages/style_distill/BASE/KEY` holds `lora/` (the evaluated LoRA with the style
variant's card and lineage: the folder publish ships), `report.md` (the variants side by side) and
`metrics.json`. The style LoRA must be UNet-only or UNet + text encoder: the VAE is never touched by a
LoRA, so the synthesized data is encoded with the base's own VAE (its shards keyed by that fingerprint).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import BaseConfig, MergeConfig, Params
from components.evaluate.merge_eval import (
    comparison_table,
    fd_retention,
    measure_row,
    sample_plan,
    sample_reference,
)
from components.lineage import collect, utc_now, write_lineage
from components.lora.formats import LORA_WEIGHT_NAME
from components.lora.model_card import render_model_card
from components.models.base_model import ResolvedBase, fingerprint_base
from components.paths import project_path
from components.progress import Progress, ProgressFn
from components.stages.inputs import MissingInput, curated_manifest, lora_sha256, stored_sha256
from components.stages.keys import base_identity, distill_key, output_rel, section_digest, stage_key
from components.storage.content_hash import file_sha256
from components.storage.folder_sync import is_complete, pull_folder, push_folder, work_dir
from components.storage.storage import Storage

STAGE = "style_distill"
FUSED = "fused"  # stages/fused/BASE/KEY: the base with the style LoRA fused in, a diffusers folder
VARIANT_LORA = "lora"  # in the keyed folder: what publish ships
STYLE, LCM = "style", "lcm"  # adapter names while measuring
CARD_TAGS = ("lora", "lcm", "lcm-lora", "style", "text-to-image", "stable-diffusion", "diffusers")


@dataclass(frozen=True)
class StyleDistillOutput:
    """What the stage produced: the variant's LoRA folder, its evaluation and its row beside the merge's."""

    folder: Path  # the local keyed folder (the keyed folder itself on a local root)
    rel: str | None  # stages/style_distill/BASE/KEY below storage.root
    fused: ResolvedBase  # the style model, resolved as its own base
    row: dict[str, Any]  # its merge-table row (fd, adherence, style_strength, style_retention, ...) + stage_seconds
    passed: bool  # the evaluation gate of the LoRA on the fused model
    violations: tuple[str, ...]
    seconds: float  # device time of the whole stage (synthesize, curate, encode, distill, evaluate, measure)
    reused: bool = False  # the keyed folder already held this variant: nothing ran

    @property
    def lora_folder(self) -> Path:
        return self.folder / VARIANT_LORA

    @property
    def style_retention(self) -> float | None:
        return self.row["style_retention"]

    @property
    def adherence(self) -> float:
        return self.row["adherence"]

    @property
    def fd(self) -> float:
        return self.row["fd"]


def style_slug(style_file: str | Path) -> str:
    """A registry-safe name for a style LoRA: its folder name (or file stem), lowercase."""
    path = Path(style_file)
    stem = path.parent.name if path.name == LORA_WEIGHT_NAME else path.stem
    return re.sub(r"[^a-z0-9.-]+", "-", stem.lower()).strip("-.") or "style"


def prompts_digest(params: Params, manifest_hash: str | None) -> str:
    """What the synthesized prompts come from: `synthesize.prompts` (its sha256), else the curated manifest
    (`manifest_hash`: the base's curation, whose captions the synthesize stage samples)."""
    if params.synthesize.prompts:
        return file_sha256(project_path(params.synthesize.prompts))
    if manifest_hash is None:
        raise MissingInput("style-distill: synthesize.prompts is unset and no curated manifest was given; run "
                           "`lcmlora curate` first or set synthesize.prompts")
    return manifest_hash


def style_distill_key(params: Params, base: ResolvedBase, style_sha256: str, style_weight: float,
                      prompts: str) -> str:
    """The base, the style LoRA and its l1, the prompts' source (`prompts_digest`) and every section the stage
    runs under."""
    sections = {name: section_digest(getattr(params, name))
                for name in ("curate", "encode", "distill", "evaluate")}
    return stage_key(STAGE, base=base_identity(base.name, base.config, base.fingerprints), style=style_sha256,
                     style_weight=style_weight, prompts=prompts, **sections,
                     synthesize=section_digest(params.synthesize.model_dump(
                         mode="json", exclude={"style", "style_weight"})),
                     merge=section_digest(params.merge.model_dump(mode="json", exclude={"style_file", "fallback"})))


def fuse_style(base: ResolvedBase, storage: Storage, style_file: Path, weight: float) -> ResolvedBase:
    """The base with `style_file` fused at `weight`, saved as `stages/fused/BASE/KEY` and resolved as its own base."""
    from components.stages.synthesize import sampled_model

    rel = output_rel(FUSED, stage_key(FUSED, base=base_identity(base.name, base.config, base.fingerprints),
                                      style=lora_sha256(style_file), weight=weight), base.name)
    if not is_complete(storage, rel):
        folder = work_dir(storage, rel)
        pipe, _ = sampled_model(base, style_file, weight)  # the synthesize stage's fusion: the same weights
        pipe.save_pretrained(folder, safe_serialization=True)
        push_folder(storage, folder, rel)
    local = pull_folder(storage, rel)
    # The style model is not the base's hub model: no hub id (the variant's card names the base instead).
    config = base.config.model_copy(update={"reference": str(local), "hub_id": None})
    return fingerprint_base(f"{base.name}-{style_slug(style_file)}", config)


USE_STEPS = (2, 4, 8)  # the dedicated LoRA on the fused model is also sampled at these step counts


def measure_variant(cfg: MergeConfig, device: str, *, base: ResolvedBase, fused: ResolvedBase, style_file: Path,
                    lora_folder: Path, judges: Any, prompts: list[str], style_weight: float,
                    far_fd: float | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The variant's merge-table row, the LoRA on the fused model at `merge.lcm_steps`, against the style
    reference (the style LoRA alone on the base, the merge's prompts and noise); and the rows of how users
    will run it, from the same noise: the fused model at the other `USE_STEPS`, and the unfused base with the
    style LoRA at l1 and this LoRA at 1.0 as two adapters at runtime (how ComfyUI users stack them).

    `far_fd` (the merge's LCM-LoRA-alone FD) gives the FD-based retention where the judges have no style scorer.
    """
    from components.evaluate.sampler_matrix import Method, run_method
    from components.lora import io as lora_io

    config = base.config

    def measured(pipe: Any, label: str, steps: int, weights: tuple[float, float]) -> dict[str, Any]:
        image_prompts, seeds, noise = sample_plan(pipe, prompts, cfg, config.resolution)
        run = run_method(pipe, Method("lcm", steps, cfg.lcm_guidance_scale, True), image_prompts, noise, seeds,
                         height=config.resolution, width=config.resolution, batch_size=50)
        row = measure_row(label, "distilled", weights, run.images, image_prompts, judges, reference.features,
                          judges.style, reference.strength, run.seconds_per_image, None)
        if judges.style is None:
            row["style_retention"] = fd_retention(row["fd"], far_fd) if far_fd is not None else None
        row["steps"] = steps
        return row

    # 1. The reference, on the base with the style LoRA as its one adapter.
    pipe = base.load().pipe.to(device)
    lora_io.load_adapter(pipe, config.family, lora_io.lora_file(style_file), STYLE)
    lora_io.set_weights(pipe, {STYLE: 1.0})
    reference = sample_reference(pipe, cfg, judges, prompts, teacher_guidance=config.guidance_scale,
                                 resolution=config.resolution)
    # 2. Runtime stacking on the unfused base: the style LoRA at l1 and the distilled LoRA at 1.0.
    lora_io.load_adapter(pipe, config.family, lora_folder, LCM)
    lora_io.set_weights(pipe, {STYLE: style_weight, LCM: 1.0})
    runtime = measured(pipe, f"base + style x{style_weight:g} + style-distilled LoRA at runtime, lcm-{cfg.lcm_steps}",
                       cfg.lcm_steps, (style_weight, 1.0))
    runtime["variant"] = "distilled, runtime adapters"
    del pipe
    # 3. The distilled LoRA on the fused model, from the same noise, at merge.lcm_steps and the other use steps.
    fused_pipe = fused.load().pipe.to(device)
    fused_pipe.set_progress_bar_config(disable=True)
    lora_io.load_adapter(fused_pipe, config.family, lora_folder, LCM)
    lora_io.set_weights(fused_pipe, {LCM: 1.0})
    on_fused = {n: measured(fused_pipe, f"style-distilled lcm-{n}", n, (style_weight, 1.0))
                for n in sorted({*USE_STEPS, cfg.lcm_steps})}
    return on_fused[cfg.lcm_steps], [*on_fused.values(), runtime]


def style_distill_stage(params: Params, base: ResolvedBase, storage: Storage, *, style: str | Path,
                        style_weight: float | None = None, merge_doc: dict[str, Any] | None = None,
                        key: str | None = None, judges: Any = None,
                        progress: ProgressFn | None = None) -> StyleDistillOutput:
    """The style-distill stage's one call: base + style LoRA -> an LCM-LoRA for the fused model, evaluated.

    `style_weight` (l1) defaults to `synthesize.style_weight`; `merge_doc` (the merge stage's metrics.json)
    puts its merged rows beside this one in the report. The variant goes to `stages/style_distill/BASE/KEY`
    (`key` when the caller has computed it); a complete one stored there is reused.
    """
    from components.evaluate.judges import load_judges
    from components.stages.curate import curate_stage
    from components.stages.distill import distill_stage
    from components.stages.encode import encode_stage
    from components.stages.evaluate import prompts_for
    from components.stages.synthesize import synthesize_stage

    t0, started_at = time.perf_counter(), utc_now()
    style_file = project_path(style)
    weight = params.synthesize.style_weight if style_weight is None else float(style_weight)
    style_sha = lora_sha256(style_file)
    if key is None:
        manifest = None if params.synthesize.prompts else \
            stored_sha256(storage, curated_manifest(params, storage, base.config.resolution))
        key = style_distill_key(params, base, style_sha, weight, prompts_digest(params, manifest))
    rel = output_rel(STAGE, key, base.name)
    folder = work_dir(storage, rel)
    if is_complete(storage, rel):
        return stored_output(storage, rel)
    seconds: dict[str, float] = {}

    def step(name: str, index: int) -> float:
        if progress is not None:
            progress(Progress(stage=STAGE, step=index, total=6, note=name))
        return time.perf_counter()

    # 1. The style model: base + l1 * tau_style, a base of its own (fingerprints, folder).
    t = step("fuse", 0)
    fused = fuse_style(base, storage, style_file, weight)
    seconds["fuse"] = time.perf_counter() - t
    # 2. Its data: its own samples as a source, curated, encoded with its VAE (the base's: a LoRA leaves it alone).
    t = step("synthesize", 1)
    synthesized = synthesize_stage(params, base, storage, style=style_file, style_weight=weight, progress=progress)
    run = params.model_copy(update={"curate": params.curate.model_copy(
        update={"source": storage.url(synthesized.source)})})
    seconds["synthesize"] = time.perf_counter() - t
    t = step("curate", 2)
    curated = curate_stage(run, storage, min_side=base.config.resolution, progress=progress)
    seconds["curate"] = time.perf_counter() - t
    t = step("encode", 3)
    encoded = encode_stage(run, fused, storage, manifest=curated.manifest, progress=progress)
    seconds["encode"] = time.perf_counter() - t
    # 3. Its LCM-LoRA: the fused pipeline is the teacher.
    t = step("distill", 4)
    distilled = distill_stage(run, fused, storage, index=encoded.index, progress=progress,
                              key=distill_key(run, fused.name, fused.config, fused.fingerprints, encoded.index_hash))
    seconds["distill"] = time.perf_counter() - t
    # 4. The same judges: the evaluation gate on the fused model, then the style row beside the merge's.
    t = step("evaluate", 5)
    judges = judges if judges is not None else load_judges(params.evaluate, base.config, base.name)
    evaluation_rel_, evaluated_lora, gate = evaluated_on(run, fused, storage, pull_folder(storage, distilled.rel),
                                                         judges, progress)
    far_fd = merge_doc["rows"][1]["fd"] if merge_doc else None  # the merge's lcm-alone row
    row, uses = measure_variant(params.merge, params.evaluate.device, base=base, fused=fused, style_file=style_file,
                                lora_folder=evaluated_lora, judges=judges,
                                prompts=prompts_for(params.evaluate, judges, base.name, base.config),
                                style_weight=weight, far_fd=far_fd)
    seconds["evaluate"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    row["stage_seconds"] = round(total, 1)
    # 5. The variant folder: the evaluated LoRA with its own card and lineage, the report, the metrics.
    doc = {"base": base.name, "base_fingerprint": base.fingerprint, "base_reference": base.config.reference,
           "style": {"path": str(style_file), "sha256": style_sha, "weight": weight, "slug": style_slug(style_file)},
           "fused": {"name": fused.name, "fingerprints": fused.fingerprints,
                     "config": fused.config.model_dump(mode="json")},
           "synthesized": synthesized.as_dict(), "latents": {"index": encoded.index, "index_hash": encoded.index_hash},
           "lora": {"distill": distilled.rel, "weights_sha256": distilled.weights_sha256, "evaluation": evaluation_rel_},
           "gate": gate,
           "row": row, "use_rows": uses, "merge_rows": merged_rows(merge_doc),
           "seconds": {k: round(v, 1) for k, v in seconds.items()},
           "started_at": started_at}
    write_variant(folder, doc, evaluated_lora, params, base, started_at)
    push_folder(storage, folder, rel)
    if progress is not None:
        progress(Progress(stage=STAGE, step=6, total=6, note="done", metrics={
            k: row[k] for k in ("fd", "adherence", "style_retention") if row[k] is not None}))
    return StyleDistillOutput(folder=folder, rel=rel, fused=fused, row=row, passed=gate["passed"],
                              violations=tuple(gate["violations"]), seconds=total)


def evaluated_on(params: Params, fused: ResolvedBase, storage: Storage, lora: Path, judges: Any,
                 progress: ProgressFn | None) -> tuple[str, Path, dict[str, Any]]:
    """The LoRA's evaluation on the fused model: (its folder, the judged LoRA copy, its gate); a complete
    evaluation of this key (a run stopped after it) is reused, as the flows' evaluate cache does."""
    from components.evaluate.evaluation import EVALUATED_LORA
    from components.stages.evaluate import evaluate_stage
    from components.stages.inputs import evaluation_rel

    rel = evaluation_rel(params, fused, lora)
    if not is_complete(storage, rel):
        evaluate_stage(params, fused, storage, lora=lora, judges=judges, progress=progress)
    local = pull_folder(storage, rel)
    gate = json.loads((local / "metrics.json").read_text())["gate"]
    return rel, local / EVALUATED_LORA, {"passed": bool(gate["passed"]), "violations": list(gate["violations"])}


def merged_rows(merge_doc: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The merge's merged-LoRA rows, each with the merge stage's seconds (what the grid cost)."""
    if not merge_doc:
        return []
    return [{**r, "stage_seconds": merge_doc.get("seconds")} for r in merge_doc["rows"] if r["variant"] == "merged"]


def stored_output(storage: Storage, rel: str) -> StyleDistillOutput:
    """The variant stored complete in `rel`."""
    folder = pull_folder(storage, rel)
    doc = json.loads((folder / "metrics.json").read_text())
    fused = ResolvedBase(name=doc["fused"]["name"], config=BaseConfig(**doc["fused"]["config"]),
                         fingerprints=doc["fused"]["fingerprints"])
    return StyleDistillOutput(folder=folder, rel=rel, fused=fused, row=doc["row"], passed=doc["gate"]["passed"],
                              violations=tuple(doc["gate"]["violations"]), seconds=0.0, reused=True)


def write_variant(folder: Path, doc: dict[str, Any], evaluated_lora: Path, params: Params, base_model: ResolvedBase,
                  started_at: str) -> None:
    """`lora/` (the evaluated LoRA with the variant's card, metrics and lineage), report.md and metrics.json."""
    folder.mkdir(parents=True, exist_ok=True)
    lora = folder / VARIANT_LORA
    if lora.exists():
        shutil.rmtree(lora)
    shutil.copytree(evaluated_lora, lora)
    row, style, base = doc["row"], doc["style"], doc["base"]
    base_config = base_model.config
    # 1. The card: an adapter of the style model (base + style fused), naming both.
    title = f"{base}-lcm-lora-{style['slug']}"
    body = (f"\n## Style variant\n\nAn LCM-LoRA distilled for `{base}` with the style LoRA "
            f"`{Path(style['path']).name}` (sha256 `{style['sha256'][:16]}...`) fused in at l1 = {style['weight']:g}, "
            "on that model's own samples: load the base, fuse the style LoRA, then load this LoRA.\n\n"
            "```python\n"
            'pipe.load_lora_weights("path/to/style_lora", adapter_name="style")\n'
            f'pipe.fuse_lora(lora_scale={style["weight"]:g}, adapter_names=["style"])\n'
            "pipe.unload_lora_weights()\n"
            'pipe.load_lora_weights("path/to/this/folder")\n'
            "```\n\n"
            "The training-free merge of the style LoRA and the base's LCM-LoRA lost the style "
            "(merge.min_style_retention); the variants side by side:\n\n"
            + comparison_table(doc["merge_rows"] + [row]) + "\n\nHow it runs (the same prompts and noise):\n\n"
            + comparison_table(doc["use_rows"]) + "\n")
    card = render_model_card(base_model=doc["base_reference"], title=title, tags=CARD_TAGS,
                             num_inference_steps=params.merge.lcm_steps,
                             guidance_scale=params.merge.lcm_guidance_scale, body=body, relation="adapter",
                             hub_id=base_config.hub_id, license=base_config.license,
                             extra={"style_variant": {"method": "distilled", "base": base,
                                                      "base_fingerprint": doc["base_fingerprint"],
                                                      "style_lora": style["slug"],
                                                      "style_sha256": style["sha256"], "style_weight": style["weight"],
                                                      "fused_fingerprint": doc["fused"]["fingerprints"]["unet"]}})
    (lora / "README.md").write_text(card)
    # 2. Metrics: the evaluation's (its gate), plus the style row.
    metrics_path = lora / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics["style_variant"] = {"row": row, "use_rows": doc["use_rows"], "merge_rows": doc["merge_rows"]}
    metrics_path.write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    # 3. Lineage: the base and the style LoRA, and the distillation's own record under `distill`.
    distill_lineage = json.loads((lora / "lineage.json").read_text()) if (lora / "lineage.json").is_file() else None
    write_lineage(lora, collect(
        stage=STAGE, params_digest=params.digest(), started_at=started_at,
        inputs={"base": {"name": base, "reference": doc["base_reference"], "fingerprint": doc["base_fingerprint"]},
                "style": {"path": style["path"], "sha256": style["sha256"], "weight": style["weight"]},
                "fused": doc["fused"], "synthesized": {"source": doc["synthesized"]["source"],
                                                       "key": doc["synthesized"]["key"]},
                "latents": doc["latents"], "lora": doc["lora"]},
        extra={"base": {"name": base, "reference": doc["base_reference"], "fingerprint": doc["base_fingerprint"]},
               "style": {"name": style["slug"], "sha256": style["sha256"], "weight": style["weight"]},
               "distill": distill_lineage}))
    # 4. The report and the stage's metrics.json.
    gate = doc["gate"]
    lines = ["# Style variant: distilled for the style model", "",
             (f"- base `{base}`; style LoRA `{style['path']}` fused at l1 = {style['weight']:g} "
              f"(the model `{doc['fused']['name']}`)"),
             f"- data: {doc['synthesized']['count']} own samples (`{doc['synthesized']['source']}`)",
             f"- evaluation gate on the fused model: {'passed' if gate['passed'] else 'FAILED'}", "",
             comparison_table(doc["merge_rows"] + [row]), "",
             ("How it runs: at other step counts on the fused model, and on the unfused base with the style LoRA "
              "and this LoRA as two adapters at runtime (the same prompts and noise):"), "",
             comparison_table(doc["use_rows"]), "",
             "Stage seconds: " + ", ".join(f"{k} {v:g}" for k, v in doc["seconds"].items())]
    lines += [f"- {v}" for v in gate["violations"]]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    (folder / "metrics.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
