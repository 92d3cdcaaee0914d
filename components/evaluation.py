"""Evaluate one LCM-LoRA: sampler matrix -> metrics -> gate -> metrics.json and report.

`evaluate_lora` is the core (a loaded pipeline, prompts, reference images and two pluggable
judges in; the metrics document out). `resolve_judges` picks the judges for a base from params:
the digit classifier for the toy world, a local TorchScript Inception and a local CLIP for real
bases, with an error naming the params key when one is missing. `run_evaluation` does it all
for a base named in params and writes the files.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.adherence import AdherenceMetric, clip_score_metric, digit_accuracy_metric
from components.config import BaseConfig, ConfigError, EvaluateConfig, Params
from components.frechet import (
    FeatureBackbone,
    digit_classifier_backbone,
    extract_features,
    frechet_distance_of_features,
    torchscript_backbone,
)
from components.gate import evaluate_gate
from components.image_metrics import psnr, ssim
from components.report import REPORT_FILES, write_report
from components.sampler_matrix import Method, MethodRun, build_matrix, run_matrix

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TOY_PROMPTS = "data/prompts/toy.txt"
SD_PROMPTS = "data/prompts/sd.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LORA_REPORT_DIR = "evaluation"  # report files inside the LoRA artifact folder


@dataclass(frozen=True)
class Judges:
    """The pluggable parts: Frechet features, prompt adherence, FD reference images."""

    backbone: FeatureBackbone
    backbone_name: str
    adherence: AdherenceMetric
    adherence_name: str
    reference_images: torch.Tensor  # M x 3 x H x W in [-1, 1]


@dataclass
class Evaluation:
    doc: dict[str, Any]  # what metrics.json holds
    prompts: list[str]
    grid_images: list[torch.Tensor]  # per method: one image per prompt (P x 3 x H x W)


# --- inputs -----------------------------------------------------------------------------


def project_path(path: str | Path) -> Path:
    """A relative path that does not exist from the working directory falls back to the project root."""
    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        return PROJECT_ROOT / path
    return path


def is_toy_base(params: Params, base: BaseConfig) -> bool:
    """True when the base is the embedded toy base (params toy.base_dir)."""
    return project_path(base.reference).resolve() == project_path(params.toy.base_dir).resolve()


def load_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are ignored."""
    path = project_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found; set evaluate.prompts to a text file, one prompt a line")
    prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


def toy_reference_images(seed: int = 0) -> torch.Tensor:
    """All 1,797 sklearn digits rendered as the toy source renders them (jittered): N x 3 x 32 x 32."""
    from sklearn.datasets import load_digits

    from components.toy.render import render_digit

    rng = np.random.default_rng(seed)
    arrays = [np.asarray(render_digit(d, rng), dtype=np.float32) for d in load_digits().images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def load_reference_images(folder: str | Path, resolution: int, params_key: str = "evaluate.reference_images") -> torch.Tensor:
    """Every image in a folder, centre-cropped and resized to resolution: N x 3 x R x R in [-1, 1]."""
    from PIL import Image, ImageOps

    folder = project_path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if len(files) < 2:
        raise FileNotFoundError(f"{params_key}={folder}: needs a folder with at least 2 images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for f in files:
        with Image.open(f) as im:
            fitted = ImageOps.fit(im.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(fitted, dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def resolve_judges(cfg: EvaluateConfig, toy: bool, resolution: int) -> Judges:
    """Backbone, adherence and reference images for a base; real bases must name local files."""
    backbone_kind = cfg.feature_backbone if cfg.feature_backbone != "auto" else (
        "digit_classifier" if toy else "torchscript")
    adherence_kind = cfg.adherence if cfg.adherence != "auto" else ("digit_accuracy" if toy else "clip_score")
    if backbone_kind == "digit_classifier":
        backbone, backbone_name = digit_classifier_backbone(cfg.device), "digit classifier features"
    else:
        backbone = torchscript_backbone(cfg.feature_extractor, cfg.device)
        backbone_name = f"TorchScript {Path(cfg.feature_extractor or '').name}"
    if adherence_kind == "digit_accuracy":
        adherence, adherence_name = digit_accuracy_metric(cfg.device), "digit accuracy"
    else:
        adherence, adherence_name = clip_score_metric(cfg.clip_model, cfg.device), "CLIP score"
    if cfg.reference_images:
        reference = load_reference_images(cfg.reference_images, resolution)
    elif toy:
        reference = toy_reference_images(cfg.seed)
    else:
        raise ConfigError("evaluate.reference_images is not set: Frechet distance for a real base needs a folder "
                          "of reference images; set evaluate.reference_images=/path/to/images")
    return Judges(backbone, backbone_name, adherence, adherence_name, reference)


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


def evaluate_lora(pipe: Any, lora_folder: str | Path, cfg: EvaluateConfig, judges: Judges, prompts: list[str], *,
                  base_name: str, teacher_guidance: float, resolution: int,
                  callback: Callable[[str], None] | None = None) -> Evaluation:
    """Run the sampler matrix over `prompts` x samples_per_prompt and measure every method."""
    say = callback or (lambda _msg: None)
    # 1. Prompt-major image list: image i shows prompts[i // samples_per_prompt], from seed cfg.seed + i.
    spp = cfg.samples_per_prompt
    image_prompts = [p for p in prompts for _ in range(spp)]
    seeds = [cfg.seed + i for i in range(len(image_prompts))]
    methods: list[Method] = build_matrix(cfg.steps, cfg.teacher_steps, list(cfg.teacher_samplers), teacher_guidance,
                                         cfg.lcm_guidance_scale, cfg.tcd_gamma, cfg.lcm_without_lora)
    # 2. Sample every method from the same noise.
    t0 = time.perf_counter()
    runs = run_matrix(pipe, lora_folder, methods, image_prompts, seeds, height=resolution, width=resolution,
                      batch_size=cfg.batch_size, timestep_spacing=cfg.teacher_timestep_spacing,
                      callback=lambda r: say(f"sampled {r.method.label}: {r.seconds_per_image:.4f} s/image"))
    sampling_seconds = time.perf_counter() - t0
    # 3. Metrics per method, then the gate over all of them.
    reference_features = extract_features(judges.backbone, judges.reference_images)
    by_label = {r.method.label: r for r in runs}
    agreement = by_label.get(cfg.agreement_reference)
    rows = [method_row(r, image_prompts, judges, reference_features, agreement) for r in runs]
    gate = evaluate_gate({row["label"]: row for row in rows}, cfg)
    doc = {
        "base": base_name,
        "lora": str(lora_folder),
        "info": {
            "prompts": len(prompts), "samples_per_prompt": spp, "images_per_method": len(image_prompts),
            "seeds": [seeds[0], seeds[-1]], "resolution": resolution, "teacher_guidance_scale": teacher_guidance,
            "lcm_guidance_scale": cfg.lcm_guidance_scale, "feature_backbone": judges.backbone_name,
            "reference_images": int(judges.reference_images.shape[0]), "adherence": judges.adherence_name,
            "agreement_reference": cfg.agreement_reference if agreement is not None else None,
            "sampling_seconds": round(sampling_seconds, 3), "device": str(pipe.unet.device),
        },
        "methods": rows,
        "config": cfg.model_dump(mode="json"),
        "gate": gate.to_dict(),
    }
    grid = [r.images[::spp] for r in runs]
    return Evaluation(doc=doc, prompts=prompts, grid_images=grid)


# --- output -----------------------------------------------------------------------------


def write_evaluation(evaluation: Evaluation, output: str | Path, lora_folder: str | Path | None = None) -> dict[str, Path]:
    """metrics.json and report files into `output`; into the LoRA folder: its metrics.json gains
    `evaluation` and `gate` (other keys kept), the report files go to LORA/evaluation/."""
    output = Path(output)
    paths = write_report(evaluation.doc, evaluation.prompts, evaluation.grid_images, output)
    paths["metrics.json"] = output / "metrics.json"
    paths["metrics.json"].write_text(json.dumps(evaluation.doc, indent=2, sort_keys=False) + "\n")
    if lora_folder is not None:
        lora_folder = Path(lora_folder)
        metrics_file = lora_folder / "metrics.json"
        merged = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        merged["evaluation"] = {k: v for k, v in evaluation.doc.items() if k != "gate"}
        merged["gate"] = evaluation.doc["gate"]
        metrics_file.write_text(json.dumps(merged, indent=2) + "\n")
        (lora_folder / LORA_REPORT_DIR).mkdir(exist_ok=True)
        for name in REPORT_FILES:
            shutil.copyfile(paths[name], lora_folder / LORA_REPORT_DIR / name)
    return paths


def run_evaluation(params: Params, base: str, lora_folder: str | Path, output: str | Path | None = None,
                   callback: Callable[[str], None] | None = None) -> tuple[Evaluation, dict[str, Path]]:
    """`lcmlora evaluate`: load the base named in params, evaluate the LoRA, write the files."""
    from components.base_model import load_base, resolve_base

    cfg = params.evaluate
    name, base_cfg = resolve_base(params, base)
    lora_folder = Path(lora_folder)
    if not lora_folder.is_dir():
        raise FileNotFoundError(f"--lora {lora_folder}: no such folder; pass the LoRA artifact folder of `lcmlora distill`")
    toy = is_toy_base(params, base_cfg)
    # 1. Judges and prompts first: a missing backbone fails before any sampling.
    judges = resolve_judges(cfg, toy, base_cfg.resolution)
    prompts = load_prompts(cfg.prompts or (TOY_PROMPTS if toy else SD_PROMPTS))
    # 2. The base, once; the teacher is the same weights with the LoRA disabled.
    loaded = load_base(str(project_path(base_cfg.reference)), family=base_cfg.family)
    pipe = loaded.pipe.to(cfg.device)
    evaluation = evaluate_lora(pipe, lora_folder, cfg, judges, prompts, base_name=name,
                               teacher_guidance=base_cfg.guidance_scale, resolution=base_cfg.resolution,
                               callback=callback)
    evaluation.doc["base_fingerprint"] = loaded.fingerprint
    out = Path(output) if output is not None else Path(cfg.output) / name
    return evaluation, write_evaluation(evaluation, out, lora_folder)
