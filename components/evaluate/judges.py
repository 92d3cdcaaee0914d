"""The judges evaluation and merging use: Frechet features, prompt adherence, FD reference
images, an optional style scorer, and the prompt file they expect.

A judges provider is `fn(cfg: EvaluateConfig, resolution: int) -> Judges`, found by name among
the Python entry points of group `lcmlora.judges` (pyproject.toml). `bases.NAME.judges` names
the provider a base gets: `real` (below: a local TorchScript Inception, a local CLIP, a folder
of reference images) or any installed one, such as the toy world's digit judges. A provider may
also have a `problems(cfg) -> list[str]` attribute: what it lacks, checked by the preflight
(components/preflight.py) before any stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from components.config import BaseConfig, ConfigError, EvaluateConfig
from components.evaluate.adherence import AdherenceMetric, clip_score_metric
from components.evaluate.frechet import FeatureBackbone, torchscript_backbone
from components.paths import project_path
from components.plugins import load_plugin

JUDGES_GROUP = "lcmlora.judges"  # entry-point group of judges providers
SD_PROMPTS = "data/prompts/sd.txt"  # the real judges' prompt file when evaluate.prompts is unset
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class StyleScorer(Protocol):
    """How strongly images show a style: 0 = the base's look, 1 = the style set's look."""

    def mean_strength(self, images: torch.Tensor) -> float: ...


@dataclass(frozen=True)
class Judges:
    """The pluggable parts of an evaluation (images are B x 3 x H x W in [-1, 1])."""

    backbone: FeatureBackbone  # images -> B x D features for Frechet distance
    backbone_name: str  # shown in metrics.json and the report
    adherence: AdherenceMetric  # (images, prompts) -> float, higher is better
    adherence_name: str
    reference_images: torch.Tensor  # M x 3 x H x W in [-1, 1], the FD reference set
    style: StyleScorer | None = None  # style strength for merged variants; None: no style column
    style_name: str = ""
    default_prompts: str | None = None  # prompt file used when evaluate.prompts is unset


def load_reference_images(folder: str | Path, resolution: int,
                          params_key: str = "evaluate.reference_images") -> torch.Tensor:
    """Every image in a folder, centre-cropped and resized to resolution: N x 3 x R x R in [-1, 1]."""
    from PIL import Image, ImageOps

    folder = project_path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if len(files) < 2:
        raise FileNotFoundError(f"{params_key}={folder}: needs a folder with at least 2 images "
                                f"({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for f in files:
        with Image.open(f) as im:
            fitted = ImageOps.fit(im.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(fitted, dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def real_judges(cfg: EvaluateConfig, resolution: int) -> Judges:
    """Inception features (local TorchScript file), CLIP score (local folder), a reference folder.

    Each missing file is an error naming its params key: a real base never skips a judge.
    """
    backbone = torchscript_backbone(cfg.feature_extractor, cfg.device)
    adherence = clip_score_metric(cfg.clip_model, cfg.device)
    if not cfg.reference_images:
        raise ConfigError("evaluate.reference_images is not set: Frechet distance for a real base needs a folder "
                          "of reference images; set evaluate.reference_images=/path/to/images")
    reference = load_reference_images(cfg.reference_images, resolution)
    return Judges(backbone, f"TorchScript {Path(cfg.feature_extractor or '').name}", adherence, "CLIP score",
                  reference, default_prompts=SD_PROMPTS)


def real_judges_problems(cfg: EvaluateConfig) -> list[str]:
    """Every file the real judges need and lack, each naming its params key (no model is loaded)."""
    needs = [("evaluate.feature_extractor", cfg.feature_extractor, "a local TorchScript Inception file",
              lambda p: p.is_file()),
             ("evaluate.clip_model", cfg.clip_model, "a local CLIP folder (config.json, weights, processor)",
              lambda p: (p / "config.json").is_file()),
             ("evaluate.reference_images", cfg.reference_images, "a folder of reference images",
              lambda p: p.is_dir())]
    problems = []
    for key, value, what, present in needs:
        if not value:
            problems.append(f"{key} is not set: a real base's judges need {what}; set {key}=/path/to/it")
        elif not present(project_path(value)):
            problems.append(f"{key}={value}: not found; point it at {what}")
    return problems


real_judges.problems = real_judges_problems  # type: ignore[attr-defined]  # checked by the preflight


def judges_problems(cfg: EvaluateConfig, base: BaseConfig, base_name: str) -> list[str]:
    """What the judges provider of `bases.NAME.judges` lacks: an unknown name, or its own `problems`."""
    try:
        provider = load_plugin(JUDGES_GROUP, base.judges, f"bases.{base_name}.judges")
    except ConfigError as exc:
        return [str(exc)]
    check = getattr(provider, "problems", None)
    return list(check(cfg)) if check else []


def load_judges(cfg: EvaluateConfig, base: BaseConfig, base_name: str) -> Judges:
    """The judges of the provider `bases.NAME.judges` names, built for the base's resolution."""
    provider = load_plugin(JUDGES_GROUP, base.judges, f"bases.{base_name}.judges")
    return provider(cfg, base.resolution)
