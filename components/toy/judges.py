"""The toy world's judges (entry point `toy` in group `lcmlora.judges`).

- Frechet features: the digit classifier's penultimate layer, in place of Inception.
- Prompt adherence: digit accuracy, the share of images whose digit (read by the digit
  classifier) is the digit their prompt names ("a handwritten digit seven" -> 7), in place of
  CLIP score.
- Reference images: all 1,797 sklearn digits rendered as the toy source renders them.
- Style: the toy style strength (`components/toy/style_metric.py`), fitted on first use.
"""

from __future__ import annotations

import re
from functools import cached_property

import numpy as np
import torch

from components.config import EvaluateConfig
from components.evaluate.adherence import AdherenceMetric
from components.evaluate.frechet import FeatureBackbone
from components.evaluate.judges import Judges, load_reference_images
from components.toy.render import DIGIT_WORDS

TOY_PROMPTS = "data/prompts/toy.txt"  # the toy judges' prompt file when evaluate.prompts is unset


def digit_label(prompt: str) -> int:
    """The digit a toy prompt names: "a handwritten digit seven" -> 7 (the last digit word wins)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    found = [DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS]
    if not found:
        raise ValueError(f"prompt {prompt!r} names no digit ({', '.join(DIGIT_WORDS)}); "
                         "digit accuracy needs toy prompts such as 'a handwritten digit seven'")
    return found[-1]


def digit_accuracy_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose arg-max class equals the label (B x 10 logits, B labels)."""
    return float((logits.argmax(dim=1).cpu() == labels.cpu()).double().mean())


def digit_accuracy_metric(device: str = "cpu", classifier=None) -> AdherenceMetric:
    """Digit accuracy with the toy digit classifier (loaded from data/toy/classifier unless given)."""
    if classifier is None:
        from components.toy.classifier import load_digit_classifier

        classifier = load_digit_classifier().to(device)

    def metric(images: torch.Tensor, prompts: list[str]) -> float:
        labels = torch.tensor([digit_label(p) for p in prompts])
        logits = torch.cat([classifier.logits(images[i:i + 256]) for i in range(0, images.shape[0], 256)])
        return digit_accuracy_from_logits(logits, labels)

    return metric


def digit_classifier_backbone(device: str = "cpu") -> FeatureBackbone:
    """The toy Frechet backbone: the digit classifier's penultimate-layer features."""
    from components.toy.classifier import load_digit_classifier

    classifier = load_digit_classifier().to(device)
    return classifier.features


def toy_reference_images(seed: int = 0) -> torch.Tensor:
    """All 1,797 sklearn digits rendered as the toy source renders them (jittered): N x 3 x 32 x 32."""
    from sklearn.datasets import load_digits

    from components.toy.render import render_digit

    rng = np.random.default_rng(seed)
    arrays = [np.asarray(render_digit(d, rng), dtype=np.float32) for d in load_digits().images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


class LazyToyStyle:
    """The toy style metric, fitted (about a second) the first time a merge asks for it."""

    @cached_property
    def metric(self):
        from components.toy.style_metric import toy_style_metric

        return toy_style_metric()

    def mean_strength(self, images: torch.Tensor) -> float:
        return self.metric.mean_strength(images)


def toy_judges(cfg: EvaluateConfig, resolution: int) -> Judges:
    """Digit-classifier features, digit accuracy, toy references (or evaluate.reference_images), toy style."""
    backbone = digit_classifier_backbone(cfg.device)
    adherence = digit_accuracy_metric(cfg.device)
    if cfg.reference_images:
        reference = load_reference_images(cfg.reference_images, resolution)
    else:
        reference = toy_reference_images(cfg.seed)
    return Judges(backbone, "digit classifier features", adherence, "digit accuracy", reference,
                  style=LazyToyStyle(), style_name="toy style strength (LDA over colour statistics)",
                  default_prompts=TOY_PROMPTS)
