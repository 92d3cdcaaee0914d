"""Frechet distance between two image sets over a pluggable feature backbone.

FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))   (Dowson & Landau
1982; FID, Heusel et al. 2017, eq. 6). With Inception features it is the FID; other backbones
(the toy world's digit classifier) plug in through `components/evaluate/judges.py`.

A backbone is any callable `images (Bx3xHxW float in [-1, 1]) -> B x D features`:
`torchscript_backbone(path)` for a local Inception (the TorchScript FID Inception used by
StyleGAN2-ADA and clean-fid takes uint8-range NCHW images of any size and `return_features=True`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FeatureBackbone = Callable[[torch.Tensor], torch.Tensor]


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """N x D features -> (mu: D, sigma: D x D), the unbiased sample mean and covariance (float64)."""
    feats = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(
        features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature_statistics: expected N x D features with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via its eigendecomposition."""
    values, vectors = np.linalg.eigh((sigma + sigma.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) (FID eq. 6).

    Tr((S1 S2)^(1/2)) = sum of sqrt(eig(S1^(1/2) S2 S1^(1/2))): that matrix is symmetric PSD and
    similar to S1 S2, so the trace needs no complex sqrtm and no epsilon on the diagonal.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance_of_features(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """FD between two feature sets (N x D and M x D)."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


@torch.no_grad()
def extract_features(backbone: FeatureBackbone, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Run `backbone` over Bx3xHxW images in [-1, 1] in batches -> B x D float32 CPU features."""
    out = [backbone(images[i:i + batch_size]).float().cpu() for i in range(0, images.shape[0], batch_size)]
    feats = torch.cat(out)
    if feats.ndim != 2 or feats.shape[0] != images.shape[0]:
        raise ValueError(f"feature backbone returned shape {tuple(feats.shape)} for {images.shape[0]} images; "
                         "a backbone must return one feature vector per image (B x D)")
    return feats


def torchscript_backbone(path: str | Path | None, device: str = "cpu",
                         params_key: str = "evaluate.feature_extractor") -> FeatureBackbone:
    """A local TorchScript feature extractor (e.g. the FID Inception `inception-2015-12-05.pt`).

    It is called as `module(x, return_features=True)` with x = NCHW float images in [0, 255].
    A missing path is an error naming the params key: a real base never falls back silently.
    """
    if not path:
        raise FileNotFoundError(
            f"{params_key} is not set: Frechet distance for a real base needs a local TorchScript Inception "
            f"(e.g. inception-2015-12-05.pt, as used by StyleGAN2-ADA / clean-fid); set {params_key}=/path/to/it")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{params_key}={path}: no such file; point it at a local TorchScript feature extractor")
    module = torch.jit.load(str(path), map_location=device).eval()

    def backbone(images: torch.Tensor) -> torch.Tensor:
        x = ((images.float().clamp(-1, 1) + 1.0) * 127.5).to(device)
        return module(x, return_features=True).flatten(1)

    return backbone
