"""Evaluate one LCM-LoRA: sampler matrix -> metrics -> gate -> metrics.json and report.

`evaluate_lora` is the core (a loaded pipeline, prompts and the judges in; the metrics document
out); `write_evaluation` writes the files. The judges (FD features, adherence, reference images)
come from `components/evaluate/judges.py`; the stage runner is `components/stages/evaluate.py`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.config import EvaluateConfig
from components.evaluate.flat_metrics import evaluation_scalars, write_flat_metrics
from components.evaluate.frechet import extract_features, frechet_distance_of_features
from components.evaluate.gate import evaluate_gate
from components.evaluate.image_metrics import psnr, ssim
from components.evaluate.judges import Judges
from components.evaluate.report import REPORT_FILES, write_report
from components.evaluate.sampler_matrix import Method, MethodRun, build_matrix, run_matrix
from components.lineage import portable
from components.lora.objective import SamplingRecipe, recipe_of_lora
from components.paths import project_path
from components.progress import Progress, ProgressFn
from components.storage.atomic_dir import atomic_dir, write_text_atomic
from components.storage.content_hash import file_sha256

LORA_REPORT_DIR = "evaluation"  # report files inside the LoRA artifact folder
# What a previous evaluation left in its output folder; a folder holding anything else
# (a LoRA folder passed as --output) is never replaced.
OUTPUT_OWNS = ("*.json", "*.md", "*.html", "*.png", "*.csv")
EVALUATED_LORA = "lora"  # the judged copy of the LoRA inside an evaluation folder (publish ships it)


@dataclass
class Evaluation:
    doc: dict[str, Any]  # what metrics.json holds
    prompts: list[str]
    grid_images: list[torch.Tensor]  # per method: one image per prompt (P x 3 x H x W)


# --- inputs -----------------------------------------------------------------------------


def load_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are ignored."""
    path = project_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found; set evaluate.prompts to a text file, one prompt a line")
    prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


def pcm_edges(sampling: SamplingRecipe) -> Callable[[int], tuple[int, ...]]:
    """The timesteps of a PCM-LoRA's N-step rows: its trained edges at N = its phases, else an N-phase split."""
    from components.distill.pcm import pcm_sampling_timesteps

    def edges(steps: int) -> tuple[int, ...]:
        if steps == sampling.phases and sampling.timesteps:
            return sampling.timesteps
        return tuple(int(t) for t in pcm_sampling_timesteps(steps).tolist())

    return edges


def negative_prompts_for(path: str | Path, prompts: list[str]) -> list[str]:
    """The negative prompt of each prompt: line j of the file for prompt j, or its one line for all."""
    negatives = load_prompts(path)
    if len(negatives) == 1:
        return negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"{path}: {len(negatives)} negative prompts for {len(prompts)} prompts; give one line "
                         "per prompt, in the prompt file's order, or a single line for all of them")
    return negatives


# --- core -------------------------------------------------------------------------------


def method_row(run: MethodRun, image_prompts: list[str], judges: Judges, reference_features: torch.Tensor,
               agreement: MethodRun | None) -> dict[str, Any]:
    """All metrics of one method; PSNR/SSIM are None for the agreement reference itself."""
    m = run.method
    features = extract_features(judges.backbone, run.images)
    row: dict[str, Any] = {
        "label": m.label, "sampler": m.sampler, "steps": m.steps, "guidance_scale": m.guidance_scale,
        "lora": m.lora, "gamma": m.gamma,
        "fd": frechet_distance_of_features(features, reference_features),
        "adherence": judges.adherence(run.images, image_prompts),
        "psnr": None, "ssim": None,
        "unet_evals_per_image": run.unet_evals_per_image, "seconds_per_image": run.seconds_per_image,
    }
    if agreement is not None and agreement is not run:
        row["psnr"] = float(psnr(run.images, agreement.images).clamp(max=100.0).mean())
        row["ssim"] = float(ssim(run.images, agreement.images).mean())
    return row


def lora_identity(lora_folder: str | Path) -> dict[str, str]:
    """What names the judged LoRA in metrics.json: its weights file's name and sha256 (never a path)."""
    from components.lora.io import lora_file

    weights = lora_file(lora_folder)
    return {"file": weights.name, "sha256": file_sha256(weights)}


def evaluate_lora(pipe: Any, lora_folder: str | Path, cfg: EvaluateConfig, judges: Judges, prompts: list[str], *,
                  base_name: str, teacher_guidance: float, resolution: int,
                  progress: ProgressFn | None = None) -> Evaluation:
    """Run the sampler matrix over `prompts` x samples_per_prompt and measure every method.

    `progress` gets one report per sampled method (step = methods done, note = its label).
    """
    # 1. Prompt-major image list: image i shows prompts[i // samples_per_prompt], from seed cfg.seed + i.
    spp = cfg.samples_per_prompt
    image_prompts = [p for p in prompts for _ in range(spp)]
    seeds = [cfg.seed + i for i in range(len(image_prompts))]
    sampling = recipe_of_lora(lora_folder)  # an LCM-LoRA samples with LCMScheduler, a PCM-LoRA at its phase edges
    methods: list[Method] = build_matrix(cfg.steps, cfg.teacher_steps, list(cfg.teacher_samplers), teacher_guidance,
                                         cfg.lcm_guidance_scale, cfg.tcd_gamma, cfg.lcm_without_lora,
                                         student=sampling.objective, cfg_scales=cfg.cfg_scales, cfg_steps=cfg.cfg_steps,
                                         student_timesteps=pcm_edges(sampling) if sampling.objective == "pcm" else None)
    negatives = ([n for n in negative_prompts_for(cfg.negative_prompts, prompts) for _ in range(spp)]
                 if cfg.negative_prompts else None)
    # 2. Sample every method from the same noise.
    done: list[MethodRun] = []

    def sampled(run: MethodRun) -> None:
        done.append(run)
        if progress is not None:
            progress(Progress(stage="evaluate", step=len(done), total=len(methods), note=run.method.label,
                              metrics={"s_per_image": run.seconds_per_image}))

    t0 = time.perf_counter()
    runs = run_matrix(pipe, lora_folder, methods, image_prompts, seeds, height=resolution, width=resolution,
                      batch_size=cfg.batch_size, timestep_spacing=cfg.teacher_timestep_spacing, callback=sampled,
                      negative_prompts=negatives)
    sampling_seconds = time.perf_counter() - t0
    # 3. Metrics per method, then the gate over all of them.
    reference_features = extract_features(judges.backbone, judges.reference_images)
    by_label = {r.method.label: r for r in runs}
    agreement = by_label.get(cfg.agreement_reference)
    rows = [method_row(r, image_prompts, judges, reference_features, agreement) for r in runs]
    gate = evaluate_gate({row["label"]: row for row in rows}, cfg, student=sampling.objective)
    doc = {
        "base": base_name,
        "lora": lora_identity(lora_folder),  # no machine path: a published folder carries this file
        "info": {
            "prompts": len(prompts), "samples_per_prompt": spp, "images_per_method": len(image_prompts),
            "seeds": [seeds[0], seeds[-1]], "resolution": resolution, "teacher_guidance_scale": teacher_guidance,
            "lcm_guidance_scale": cfg.lcm_guidance_scale, "feature_backbone": judges.backbone_name,
            **({"objective": sampling.objective, "pcm_phases": sampling.phases} if sampling.objective != "lcm" else {}),
            "reference_images": int(judges.reference_images.shape[0]), "adherence": judges.adherence_name,
            "agreement_reference": cfg.agreement_reference if agreement is not None else None,
            "sampling_seconds": round(sampling_seconds, 3), "device": str(pipe.unet.device),
        },
        "methods": rows,
        "config": portable(cfg.model_dump(mode="json")),  # backbones and prompt files by name, not path
        "gate": gate.to_dict(),
    }
    grid = [r.images[::spp] for r in runs]
    return Evaluation(doc=doc, prompts=prompts, grid_images=grid)


# --- output -----------------------------------------------------------------------------


def write_evaluation(evaluation: Evaluation, output: str | Path, lora_folder: str | Path | None = None) -> dict[str, Path]:
    """metrics.json and report files into `output`; into the LoRA folder: its metrics.json gains
    `evaluation` and `gate` (other keys kept), the report files go to LORA/evaluation/.

    `output` and LORA/evaluation/ are complete or absent (`components/storage/atomic_dir.py`): a run that
    fails while writing leaves the previous report, never half of a new one.
    """
    output = Path(output)
    # The judged copy of the LoRA (`lora/`, components/stages/evaluate.py) moves with the report.
    with atomic_dir(output, owns=(*OUTPUT_OWNS, EVALUATED_LORA), carry=(EVALUATED_LORA,)) as staging:
        written = write_report(evaluation.doc, evaluation.prompts, evaluation.grid_images, staging)
        (staging / "metrics.json").write_text(json.dumps(evaluation.doc, indent=2, sort_keys=False) + "\n")
        write_flat_metrics(staging, evaluation_scalars(evaluation.doc))  # the scalars DVC shows (dvc.yaml metrics:)
    paths = {name: output / path.name for name, path in written.items()}
    paths["metrics.json"] = output / "metrics.json"
    if lora_folder is not None:
        lora_folder = Path(lora_folder)
        with atomic_dir(lora_folder / LORA_REPORT_DIR, owns=OUTPUT_OWNS) as staging:
            for name in REPORT_FILES:
                shutil.copyfile(paths[name], staging / name)
        metrics_file = lora_folder / "metrics.json"
        merged = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        merged["evaluation"] = {k: v for k, v in evaluation.doc.items() if k != "gate"}
        merged["gate"] = evaluation.doc["gate"]
        write_text_atomic(metrics_file, json.dumps(merged, indent=2) + "\n")
    return paths
