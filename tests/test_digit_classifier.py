"""The committed digit classifier: held-out accuracy, any input size, features, and the toy style."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from components.toy.classifier import (
    DigitClassifier,
    accuracy,
    digit_split,
    load_digit_classifier,
    render_set,
    to_classifier_input,
    train_digit_classifier,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return load_digit_classifier()


@pytest.fixture(scope="module")
def held_out(digits):
    _, test_idx = digit_split(digits.target, seed=0)
    return digits.images[test_idx], digits.target[test_idx]


def test_split_is_stratified_disjoint_and_deterministic(digits):
    train, test = digit_split(digits.target, seed=0)
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(digits.target)
    assert np.array_equal(test, digit_split(digits.target, seed=0)[1])
    assert set(np.bincount(digits.target[test])) <= set(range(34, 38))


def test_held_out_accuracy_above_97_percent(classifier, held_out):
    images8, labels = held_out
    assert accuracy(classifier, render_set(images8, None), labels) > 0.97
    assert accuracy(classifier, render_set(images8, np.random.default_rng(5)), labels) > 0.97


def test_reads_the_toy_style_too(classifier, held_out):
    images8, labels = held_out
    assert accuracy(classifier, render_set(images8, np.random.default_rng(6), styled=True), labels) > 0.9


def test_any_size_and_grey_input_give_the_same_digits(classifier, held_out):
    images8, _ = held_out
    x = render_set(images8[:100], None)
    big = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    grey = x.mean(dim=1, keepdim=True)
    base = classifier.predict(x)
    assert (classifier.predict(big) == base).float().mean() > 0.95
    assert (classifier.predict(grey) == base).float().mean() > 0.95
    assert classifier.logits(x).shape == (100, 10)


def test_features_are_penultimate_and_separate_classes(classifier, held_out):
    images8, labels = held_out
    feats = classifier.features(render_set(images8, None))
    assert feats.shape == (len(labels), 64)
    labels = torch.as_tensor(labels)
    centroids = torch.stack([feats[labels == d].mean(0) for d in range(10)])
    nearest = torch.cdist(feats, centroids).argmin(1)
    assert (nearest == labels).float().mean() > 0.9


def test_input_checks_name_the_expected_layout():
    with pytest.raises(ValueError, match="Bx3xHxW"):
        to_classifier_input(torch.zeros(2, 32, 32))


def test_missing_weights_say_how_to_build_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="lcmlora toy classifier"):
        load_digit_classifier(tmp_path / "nowhere")


def test_training_learns_from_a_small_subset(digits):
    """Three short epochs on 600 digits already beat chance (10%) by far; the committed model trains 12 on 1,438."""
    train_idx, test_idx = digit_split(digits.target, seed=1)
    clf = train_digit_classifier(digits.images[train_idx[:600]], digits.target[train_idx[:600]], epochs=3,
                                 copies=2, seed=1)
    assert accuracy(clf, render_set(digits.images[test_idx], None), digits.target[test_idx]) > 0.4
