"""Evaluate style-LoRA merge variants over an (l1, l2) grid and pick the best per style.

For one base, one LCM-LoRA and one style LoRA:
- reference: the style LoRA alone, DPM-Solver++ at `merge.reference_steps` with CFG at the
  base's guidance scale (how the style is meant to look);
- per (l1, l2): variant 1 (runtime adapters), variant 2 (the exact merged LoRA), variant 3
  (fused into the base) and optionally variant 4 (SVD-compressed), each at `merge.lcm_steps`
  LCM steps from the same noise;
- metrics per row: Frechet distance to the reference images (quality of the 4-step style),
  prompt adherence, style strength and its ratio to the reference's (`style_retention`),
  and the largest pixel difference to variant 1 (variants 2 and 3 must agree with it). Style
  strength comes from the judges' style scorer where one exists (the toy world has one); otherwise
  retention is 1 - FD(row) / FD(LCM-LoRA alone), both distances to the style reference images;
- rule: among merged-LoRA rows with style_retention >= merge.min_style_retention and
  adherence >= merge.min_adherence, the best by merge.select_by. No passing row fails closed;
  where it is the style that was lost (`style_lost`), `merge.fallback: distill` distills an LCM-LoRA
  for the style model instead (components/stages/style_distill.py), measured by the same rows.

The stage runner (`components/stages/merge.py`) loads the base and writes the contract-4 folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.config import MergeConfig
from components.evaluate.flat_metrics import merge_scalars, write_flat_metrics
from components.lora import io as lora_io
from components.lora import merge
from components.progress import Progress, ProgressFn

VARIANTS = ("adapters", "merged", "fused", "svd")
STYLE, LCM, MERGED, SVD = "style", "lcm", "merged", "svd"


@dataclass
class MergeResult:
    doc: dict[str, Any]  # metrics.json
    images: dict[str, torch.Tensor]  # row label -> one image per prompt (for the grid)
    prompts: list[str]


def style_lost(rows: list[dict[str, Any]], cfg: MergeConfig) -> bool:
    """True when some merged-LoRA row falls short of `merge.min_style_retention` (or has no retention):
    where no row passes, this is the case the style-distilled fallback is for (`merge.fallback`)."""
    return any(r["variant"] == "merged" and (r["style_retention"] is None or r["style_retention"] < cfg.min_style_retention)
               for r in rows)


def select_best(rows: list[dict[str, Any]], cfg: MergeConfig) -> tuple[dict[str, Any] | None, list[str]]:
    """The rule: merged-LoRA rows meeting both thresholds, best by `select_by`; and every violation."""
    violations: list[str] = []
    passing = []
    for row in rows:
        if row["variant"] != "merged":
            continue
        bad = []
        if row["style_retention"] is None or row["style_retention"] < cfg.min_style_retention:
            bad.append(f"style retention {_fmt(row['style_retention'])} < merge.min_style_retention "
                       f"{cfg.min_style_retention:g}")
        if row["adherence"] < cfg.min_adherence:
            bad.append(f"adherence {_fmt(row['adherence'])} < merge.min_adherence {cfg.min_adherence:g}")
        violations += [f"{row['label']}: {b}" for b in bad]
        if not bad:
            passing.append(row)
    if not passing:
        return None, violations
    key = {"style_retention": lambda r: -r["style_retention"], "fd": lambda r: r["fd"],
           "adherence": lambda r: -r["adherence"]}[cfg.select_by]
    return min(passing, key=key), violations


def measure_row(label: str, variant: str, weights: tuple[float, float] | None, images: torch.Tensor,
                image_prompts: list[str], judges: Any, reference_features: torch.Tensor, style_metric: Any,
                reference_strength: float | None, seconds: float, versus: torch.Tensor | None) -> dict[str, Any]:
    """One row of the merge table: FD to the style reference, adherence, style strength and retention."""
    from components.evaluate.frechet import extract_features, frechet_distance_of_features

    strength = style_metric.mean_strength(images) if style_metric is not None else None
    return {
        "label": label, "variant": variant,
        "l1": None if weights is None else weights[0], "l2": None if weights is None else weights[1],
        "fd": frechet_distance_of_features(extract_features(judges.backbone, images), reference_features),
        "adherence": float(judges.adherence(images, image_prompts)),
        "style_strength": strength,
        "style_retention": None if strength is None or not reference_strength else strength / reference_strength,
        "max_abs_diff_vs_adapters": None if versus is None else float((images - versus).abs().max()),
        "seconds_per_image": seconds,
    }


def fd_retention(fd: float, far: float) -> float | None:
    """Style retention without a style scorer: 1 - FD(row) / FD(LCM-LoRA alone), both to the style reference."""
    return 1.0 - fd / far if far > 0 else None


def sample_plan(pipe: Any, prompts: list[str], cfg: MergeConfig,
                resolution: int) -> tuple[list[str], list[int], torch.Tensor]:
    """What every row of the merge stage samples: each prompt `cfg.samples_per_prompt` times, seeds
    `cfg.seed`, `cfg.seed + 1`, ..., and their initial noise (the same for every row)."""
    from components.evaluate.sampler_matrix import initial_noise, latent_shape

    image_prompts = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    seeds = [cfg.seed + i for i in range(len(image_prompts))]
    return image_prompts, seeds, initial_noise(seeds, latent_shape(pipe, resolution, resolution))


@dataclass(frozen=True)
class StyleReference:
    """How the style is meant to look: the style LoRA alone at `merge.reference_steps` DPM-Solver++ steps."""

    images: torch.Tensor  # (N, 3, H, W) in [-1, 1], one per (prompt, sample) of `sample_plan`
    features: torch.Tensor  # their FD backbone features
    strength: float | None  # their mean style strength (None without a style scorer)
    row: dict[str, Any]  # its row of the merge table


def sample_reference(pipe: Any, cfg: MergeConfig, judges: Any, prompts: list[str], *, teacher_guidance: float,
                     resolution: int) -> StyleReference:
    """Sample and measure the style reference on `pipe`, whose active adapter is the style LoRA at weight 1.

    The noise is `sample_plan`'s, so every caller (the merge grid, the style-distilled fallback) measures
    against the same reference images.
    """
    from components.evaluate.frechet import extract_features
    from components.evaluate.sampler_matrix import Method, run_method

    pipe.set_progress_bar_config(disable=True)
    image_prompts, seeds, noise = sample_plan(pipe, prompts, cfg, resolution)
    run = run_method(pipe, Method("dpmpp", cfg.reference_steps, teacher_guidance, True), image_prompts, noise, seeds,
                     height=resolution, width=resolution, batch_size=50)
    features = extract_features(judges.backbone, run.images)
    strength = judges.style.mean_strength(run.images) if judges.style is not None else None
    row = measure_row(f"style-alone dpmpp-{cfg.reference_steps}", "reference", (1.0, 0.0), run.images,
                      image_prompts, judges, features, judges.style, strength, run.seconds_per_image, None)
    return StyleReference(images=run.images, features=features, strength=strength, row=row)


def evaluate_merge(pipe: Any, fused_pipe: Any, family: str, style_path: Path, lcm_path: Path, cfg: MergeConfig,
                   judges: Any, prompts: list[str], *, teacher_guidance: float, resolution: int,
                   output: Path, base_meta: dict[str, Any], progress: ProgressFn | None = None) -> MergeResult:
    """Sample and measure every variant; write the merged LoRAs (and fused checkpoints) under `output`.

    `pipe` and `fused_pipe` are two loaded copies of the base: adapters go into `pipe`, deltas
    are added to (and taken back out of) `fused_pipe`'s weights. `judges` gives the FD backbone,
    the adherence scorer and, where one exists, the style scorer (`judges.style`, with
    `mean_strength(images) -> float`, named `judges.style_name`). `progress` hears of every row
    as it is measured: `Progress(stage="merge", step=rows done, total=rows, note=row label)`.
    """
    from components.evaluate.sampler_matrix import Method, run_method

    # 1. Inputs as diffusers reads them; same noise for every row.
    style_path, lcm_path = lora_io.lora_file(style_path), lora_io.lora_file(lcm_path)
    lora_io.load_adapter(pipe, family, style_path, STYLE)
    lora_io.load_adapter(pipe, family, lcm_path, LCM)
    style_f, lcm_f = lora_io.adapter_factors(pipe, STYLE), lora_io.adapter_factors(pipe, LCM)
    image_prompts, seeds, noise = sample_plan(pipe, prompts, cfg, resolution)
    pipe.set_progress_bar_config(disable=True)
    fused_pipe.set_progress_bar_config(disable=True)
    lcm_method = Method("lcm", cfg.lcm_steps, cfg.lcm_guidance_scale, True)
    style_metric = judges.style
    rows: list[dict[str, Any]] = []
    total = 3 + len(cfg.weights) * (3 if cfg.svd_rank is None else 4)

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if progress is not None:
            metrics = {k: row[k] for k in ("fd", "adherence", "style_strength") if row[k] is not None}
            progress(Progress(stage="merge", step=len(rows), total=total, note=row["label"], metrics=metrics))

    def sample(p, method) -> tuple[torch.Tensor, float]:
        run = run_method(p, method, image_prompts, noise, seeds, height=resolution, width=resolution, batch_size=50)
        return run.images, run.seconds_per_image

    def sample_folder(folder: Path, name: str) -> tuple[torch.Tensor, float]:
        # A saved LoRA folder as the only active adapter, read back as a user would load it.
        lora_io.load_adapter(pipe, family, folder, name)
        lora_io.set_weights(pipe, {name: 1.0})
        images, seconds = sample(pipe, lcm_method)
        pipe.delete_adapters(name)
        return images, seconds

    # 2. The reference: the style LoRA alone, DPM-Solver++ with CFG.
    lora_io.set_weights(pipe, {STYLE: 1.0})
    reference = sample_reference(pipe, cfg, judges, prompts, teacher_guidance=teacher_guidance,
                                 resolution=resolution)
    reference_features, ref_strength = reference.features, reference.strength
    add(reference.row)
    images = {rows[0]["label"]: reference.images[::cfg.samples_per_prompt]}
    # context rows: the LCM-LoRA alone, and the style alone at the same few steps without LCM
    lora_io.set_weights(pipe, {LCM: 1.0})
    lcm_only, s = sample(pipe, lcm_method)
    add(measure_row(f"lcm-alone lcm-{cfg.lcm_steps}", "context", (0.0, 1.0), lcm_only, image_prompts, judges,
             reference_features, style_metric, ref_strength, s, None))
    lora_io.set_weights(pipe, {STYLE: 1.0})
    style_few, s = sample(pipe, Method("dpmpp", cfg.lcm_steps, teacher_guidance, True))
    add(measure_row(f"style-alone dpmpp-{cfg.lcm_steps}", "context", (1.0, 0.0), style_few, image_prompts, judges,
             reference_features, style_metric, ref_strength, s, None))
    files: dict[str, Any] = {}
    # 3. The grid.
    for l1, l2 in cfg.weights:
        tag = f"{l1:g}_{l2:g}"
        lora_io.set_weights(pipe, {STYLE: l1, LCM: l2})
        v1, s = sample(pipe, lcm_method)
        add(measure_row(f"adapters ({l1:g}, {l2:g})", "adapters", (l1, l2), v1, image_prompts, judges,
                 reference_features, style_metric, ref_strength, s, None))
        images[rows[-1]["label"]] = v1[::cfg.samples_per_prompt]
        merged = merge.concat_ranks([(l1, style_f), (l2, lcm_f)])
        description = (f"style LoRA {style_path.name} x {l1:g} + LCM-LoRA x {l2:g} (exact rank concatenation); "
                       f"sample with LCMScheduler, {cfg.lcm_steps} steps, guidance {cfg.lcm_guidance_scale}")
        folder = output / f"merged-{tag}"
        files[f"merged-{tag}"] = {k: str(v) for k, v in merge.save_lora_folder(
            folder, merged, family=family, base_meta=base_meta, title=f"merged-{tag}", description=description).items()}
        v2, s = sample_folder(folder, MERGED)
        add(measure_row(f"merged LoRA ({l1:g}, {l2:g})", "merged", (l1, l2), v2, image_prompts, judges,
                 reference_features, style_metric, ref_strength, s, v1))
        rows[-1]["rank"] = max(f.rank for mods in merged.values() for f in mods.values())
        merge.fuse_into(fused_pipe, merged)
        try:
            v3, s = sample(fused_pipe, Method("lcm", cfg.lcm_steps, cfg.lcm_guidance_scale, False))
            if cfg.save_fused == "all":
                files[f"fused-{tag}"] = save_fused(fused_pipe, output / f"fused-{tag}", family, description)
        finally:
            merge.fuse_into(fused_pipe, merge.scaled(merged, -1.0))  # back to the base
        add(measure_row(f"fused ({l1:g}, {l2:g})", "fused", (l1, l2), v3, image_prompts, judges, reference_features,
                 style_metric, ref_strength, s, v1))
        if cfg.svd_rank is not None:
            compressed, _ = merge.svd_compress(merged, cfg.svd_rank)
            svd_folder = output / f"svd{cfg.svd_rank}-{tag}"
            merge.save_lora_folder(svd_folder, compressed, family=family, base_meta=base_meta,
                                   title=f"svd{cfg.svd_rank}-{tag}", description=description + f", SVD rank {cfg.svd_rank}")
            v4, s = sample_folder(svd_folder, SVD)
            add(measure_row(f"svd-{cfg.svd_rank} ({l1:g}, {l2:g})", "svd", (l1, l2), v4, image_prompts, judges,
                     reference_features, style_metric, ref_strength, s, v1))
            rows[-1]["svd_relative_error"] = merge.overall_relative_error(merged, compressed)
            rows[-1]["rank"] = cfg.svd_rank
    # Without a style metric (real bases) retention is read off the Frechet distance to the style
    # reference: 1 at the reference's own distribution, 0 as far from it as the LCM-LoRA without style.
    if style_metric is None:
        for row in rows:
            row["style_retention"] = fd_retention(row["fd"], rows[1]["fd"])
    # 4. The rule, then the fused checkpoint of the winner.
    best, violations = select_best(rows, cfg)
    if best is not None and cfg.save_fused == "best":
        merged = merge.concat_ranks([(best["l1"], style_f), (best["l2"], lcm_f)])
        merge.fuse_into(fused_pipe, merged)
        try:
            files["fused-best"] = save_fused(fused_pipe, output / f"fused-{best['l1']:g}_{best['l2']:g}", family,
                                            f"{best['label']} fused into the base")
        finally:
            merge.fuse_into(fused_pipe, merge.scaled(merged, -1.0))
    doc = {
        "style": str(style_path), "lcm": str(lcm_path),
        "style_summary": merge.factor_summary(style_f), "lcm_summary": merge.factor_summary(lcm_f),
        "info": {"prompts": len(prompts), "samples_per_prompt": cfg.samples_per_prompt, "seeds": [seeds[0], seeds[-1]],
                 "resolution": resolution, "teacher_guidance_scale": teacher_guidance,
                 "feature_backbone": judges.backbone_name, "adherence": judges.adherence_name,
                 "style_metric": judges.style_name if style_metric is not None else
                 "retention = 1 - FD(row) / FD(LCM-LoRA alone), FD to the style reference",
                 "reference_style_strength": ref_strength},
        "rows": rows,
        "selection": {"rule": {"min_style_retention": cfg.min_style_retention, "min_adherence": cfg.min_adherence,
                               "select_by": cfg.select_by},
                      "best": None if best is None else {"l1": best["l1"], "l2": best["l2"], "label": best["label"]},
                      "passed": best is not None, "violations": violations,
                      "style_lost": style_lost(rows, cfg) if best is None else False},
        "files": files,
        "config": cfg.model_dump(mode="json"),
    }
    return MergeResult(doc=doc, images=images, prompts=prompts)


def save_fused(pipe: Any, folder: Path, family: str, description: str) -> dict[str, str]:
    """Variant 3 on disk: a diffusers folder and an original-layout single file (`merge.save_single_file`)."""
    pipe.save_pretrained(folder, safe_serialization=True)
    single = folder.parent / f"{folder.name}.safetensors"  # not with_suffix: "fused-0.8_1" has a dot
    merge.save_single_file(pipe, single, family, {"lcmlora.merge": json.dumps(description)})
    return {"diffusers": str(folder), "single_file": str(single)}


# --- report -----------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per row: FD, adherence, style strength and retention, agreement with variant 1, cost."""
    head = "| row | FD to style ref | adherence | style strength | retention | max diff vs adapters | s/image |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {_fmt(r['fd'])} | {_fmt(r['adherence'])} | {_fmt(r['style_strength'])} | "
                     f"{_fmt(r['style_retention'])} | {_fmt(r['max_abs_diff_vs_adapters'])} | "
                     f"{_fmt(r['seconds_per_image'], 4)} |")
    return "\n".join(lines)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """The style variants side by side: retention, adherence, FD to the style reference, what each cost.

    `rows` are merge-table rows with `stage_seconds`: the device time of the stage that made the variant
    (the whole merge grid for a merged row; synthesize + curate + encode + distill + evaluate for the
    style-distilled one).
    """
    head = "| variant | retention | adherence | FD to style ref | s/image | stage seconds (device) |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {_fmt(r['style_retention'])} | {_fmt(r['adherence'])} | {_fmt(r['fd'])} | "
                     f"{_fmt(r['seconds_per_image'], 4)} | {_fmt(r.get('stage_seconds'), 1)} |")
    return "\n".join(lines)


def write_merge_report(result: MergeResult, output: Path) -> dict[str, Path]:
    """metrics.json, report.md (table + selection) and grid.png (rows: reference and variants; columns: prompts)."""
    import numpy as np
    from PIL import Image

    output.mkdir(parents=True, exist_ok=True)
    doc = result.doc
    sel = doc["selection"]
    best = sel["best"]
    lines = [
        "# Style-LoRA merge report", "",
        f"- style LoRA: `{doc['style']}`; LCM-LoRA: `{doc['lcm']}`",
        (f"- reference: the style LoRA alone, DPM-Solver++ {doc['config']['reference_steps']} steps, guidance "
         f"{doc['info']['teacher_guidance_scale']}; variants: {doc['config']['lcm_steps']} LCM steps, guidance "
         f"{doc['config']['lcm_guidance_scale']}"),
        (f"- {doc['info']['prompts']} prompts x {doc['info']['samples_per_prompt']} samples, same noise for every row; "
         f"FD over {doc['info']['feature_backbone']}, adherence = {doc['info']['adherence']}"),
        "", markdown_table(doc["rows"]), "",
        (f"Rule: merged-LoRA rows with style retention >= {sel['rule']['min_style_retention']} and adherence >= "
         f"{sel['rule']['min_adherence']}, best by {sel['rule']['select_by']}."),
        f"**Selected: {best['label']}**" if best else "**No (l1, l2) passes the rule.**",
    ]
    if sel["violations"]:
        lines += ["", "Violations:"] + [f"- {v}" for v in sel["violations"]]
    lines += ["", "`grid.png` rows, top to bottom: " + "; ".join(result.images) + " (one image per prompt)."]
    paths = {"report.md": output / "report.md", "metrics.json": output / "metrics.json", "grid.png": output / "grid.png"}
    paths["report.md"].write_text("\n".join(lines) + "\n")
    paths["metrics.json"].write_text(json.dumps(doc, indent=2) + "\n")
    write_flat_metrics(output, merge_scalars(doc))  # the scalars DVC shows (dvc.yaml metrics:)
    tiles = [torch.cat(list(imgs), dim=2) for imgs in result.images.values()]  # each row: prompts side by side
    grid = ((torch.cat(tiles, dim=1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(grid)).save(paths["grid.png"])
    return paths
