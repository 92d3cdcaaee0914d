"""Toy style strength: how far an image has moved from the plain toy rendering to the toy style.

A linear discriminant (Fisher) over ten global colour statistics, fitted on sklearn's digits
rendered plain (`render_digit`) and styled (`render_digit_styled`), and calibrated so that the
mean plain rendering scores 0 and the mean styled rendering scores 1. The statistics (channel
means and spreads, background colour, diagonal-stripe energy) are averages over the image, so
the score moves smoothly as an image blends from one look to the other: a sampler that keeps
half the style scores about 0.5, where a classifier's probability would already saturate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STYLE_FEATURES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b",
                  "border_r", "border_g", "border_b", "stripes")


def style_features(images: torch.Tensor, stripe_half_period: int = 3) -> torch.Tensor:
    """B x 3 x H x W in [-1, 1] -> B x 10: channel means, channel stds, border means, stripe energy
    (against diagonal stripes `stripe_half_period` pixels wide: 3 for the toy style, 4 for the hard one)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"style_features: expected B x 3 x H x W images in [-1, 1], got {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    border = torch.ones(h, w, dtype=torch.bool)
    border[h // 8: h - h // 8, w // 8: w - w // 8] = False  # the outer eighth: background in every rendering
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    stripes = ((((xx + yy) // stripe_half_period) % 2).float() * 2 - 1)  # the style's diagonal stripes, +-1
    grey = x.mean(1)
    stripe_energy = ((grey - grey.mean((-2, -1), keepdim=True)) * stripes)[:, border].mean(1).abs()
    return torch.cat([x.mean((-2, -1)), x.std((-2, -1)), x[:, :, border].mean(-1), stripe_energy[:, None]], dim=1)


@dataclass(frozen=True)
class StyleMetric:
    """strength(x) = (w . f(x) - plain_score) / (style_score - plain_score)."""

    weights: torch.Tensor  # 10, the discriminant direction
    plain_score: float  # mean projection of the plain renderings
    style_score: float  # mean projection of the styled renderings
    separation: float  # accuracy of the 0.5 threshold on the fitting renders
    stripe_half_period: int = 3  # the style's stripe width in pixels (style_features)

    def strength(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image style strength, B (0: plain toy look, 1: toy style; not clipped)."""
        projection = style_features(images, self.stripe_half_period).double() @ self.weights
        return ((projection - self.plain_score) / (self.style_score - self.plain_score)).float()

    def mean_strength(self, images: torch.Tensor) -> float:
        return float(self.strength(images).mean())


def fit_style_metric(plain: torch.Tensor, styled: torch.Tensor, ridge: float = 1e-3,
                     stripe_half_period: int = 3) -> StyleMetric:
    """Fisher's linear discriminant w = (S_w + ridge I)^-1 (mu_style - mu_plain), calibrated to 0 / 1."""
    fp = style_features(plain, stripe_half_period).double()
    fs = style_features(styled, stripe_half_period).double()
    scatter = torch.cov(fp.T) + torch.cov(fs.T)
    scatter += ridge * torch.eye(scatter.shape[0], dtype=scatter.dtype) * scatter.diagonal().mean()
    weights = torch.linalg.solve(scatter, fs.mean(0) - fp.mean(0))
    plain_score, style_score = float((fp @ weights).mean()), float((fs @ weights).mean())
    metric = StyleMetric(weights, plain_score, style_score, separation=0.0, stripe_half_period=stripe_half_period)
    correct = (metric.strength(plain) < 0.5).sum() + (metric.strength(styled) >= 0.5).sum()
    return StyleMetric(weights, plain_score, style_score, separation=float(correct) / (len(plain) + len(styled)),
                       stripe_half_period=stripe_half_period)


def toy_renders(count: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` sklearn digits rendered plain and styled with jitter: two N x 3 x 32 x 32 in [-1, 1]."""
    from sklearn.datasets import load_digits

    from components.toy.render import render_digit, render_digit_styled

    digits = load_digits().images
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(digits), size=min(count, len(digits)), replace=False)

    def stack(render) -> torch.Tensor:
        arrays = [np.asarray(render(digits[i], rng), dtype=np.float32) for i in pick]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0

    return stack(render_digit), stack(render_digit_styled)


def toy_style_metric(count: int = 600, seed: int = 0) -> StyleMetric:
    """The toy style metric, fitted on fresh renders (deterministic for a seed; about a second)."""
    return fit_style_metric(*toy_renders(count, seed))
