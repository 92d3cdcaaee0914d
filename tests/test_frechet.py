"""Frechet distance against closed forms and a scipy reference; the TorchScript backbone plumbing."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from components.evaluate.frechet import (
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_of_features,
    torchscript_backbone,
)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _scipy_reference(mu1, s1, mu2, s2) -> float:
    """FID as usually written: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2.0 * covmean))


def test_diagonal_gaussians_match_closed_form():
    # For diagonal covariances FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(7.25 + 4.0 + 1.0)


def test_one_dimensional_gaussians():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([2.0], [[9.0]], [-1.0], [[1.0]]) == pytest.approx(9.0 + 4.0)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_full_covariances_match_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_reference(mu1, s1, mu2, s2), rel=1e-8)


def test_identical_and_symmetric():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=8), _random_spd(rng, 8)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9
    mu2, s2 = rng.normal(size=8), _random_spd(rng, 8)
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu, s), rel=1e-10)


def test_sample_statistics_converge_to_closed_form():
    rng = np.random.default_rng(1)
    d = 4
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _random_spd(rng, d), _random_spd(rng, d)
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    assert frechet_distance_of_features(torch.from_numpy(x), y) == pytest.approx(
        frechet_distance(mu1, s1, mu2, s2), rel=0.02)
    _mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


class _MeanRGB(torch.nn.Module):
    """A TorchScript-able stand-in for the FID Inception: per-channel means of its [0, 255] input."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if not return_features:
            raise RuntimeError("expected return_features=True")
        return x.mean(dim=(2, 3))


def test_torchscript_backbone_loads_a_local_file_and_scales_to_uint8_range(tmp_path):
    path = tmp_path / "extractor.pt"
    torch.jit.save(torch.jit.script(_MeanRGB()), str(path))
    backbone = torchscript_backbone(path)
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    feats = extract_features(backbone, images, batch_size=2)
    torch.testing.assert_close(feats, ((images + 1) * 127.5).mean(dim=(2, 3)))


def test_missing_backbone_names_the_params_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate.feature_extractor is not set"):
        torchscript_backbone(None)
    with pytest.raises(FileNotFoundError, match="evaluate.feature_extractor=.*no such file"):
        torchscript_backbone(tmp_path / "absent.pt")
