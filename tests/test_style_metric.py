"""The toy style strength: 0 for plain renders, 1 for styled ones, graded in between."""

from __future__ import annotations

import pytest
import torch

from components.toy.style_metric import (
    fit_style_metric,
    style_features,
    toy_renders,
    toy_style_metric,
)


@pytest.fixture(scope="module")
def metric():
    return toy_style_metric(count=300, seed=0)


def test_calibrated_on_held_out_renders(metric):
    plain, styled = toy_renders(count=200, seed=7)  # other digits and jitter than the fit
    assert metric.separation == 1.0
    assert abs(metric.mean_strength(plain)) < 0.05
    assert abs(metric.mean_strength(styled) - 1.0) < 0.05
    assert (metric.strength(plain) < 0.5).all() and (metric.strength(styled) > 0.5).all()


def test_strength_is_graded_along_a_blend(metric):
    plain, styled = toy_renders(count=100, seed=3)
    blends = [metric.mean_strength((1 - a) * plain + a * styled) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert blends == sorted(blends)
    assert blends[2] == pytest.approx(0.5, abs=0.1)


def test_fit_and_features_check_their_inputs():
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        style_features(torch.zeros(2, 1, 32, 32))
    plain, styled = toy_renders(count=50, seed=1)
    assert fit_style_metric(plain, styled).separation == 1.0
