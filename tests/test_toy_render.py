"""The shared toy rendering: size, determinism, captions, and a visibly different style."""

from __future__ import annotations

import numpy as np
import pytest

from components.toy.classifier import load_sklearn_digits
from components.toy.render import (
    DIGIT_WORDS,
    TOY_SIZE,
    caption_for,
    render_digit,
    render_digit_styled,
)


@pytest.fixture(scope="module")
def images8() -> np.ndarray:
    return load_sklearn_digits()[0]


def test_render_is_32px_rgb_and_canonical_without_rng(images8):
    image = render_digit(images8[7])
    assert image.mode == "RGB" and image.size == (TOY_SIZE, TOY_SIZE)
    assert np.array_equal(np.asarray(image), np.asarray(render_digit(images8[7])))


def test_render_is_deterministic_for_a_seed_and_jitters_across_seeds(images8):
    a = np.asarray(render_digit(images8[3], np.random.default_rng(1)))
    b = np.asarray(render_digit(images8[3], np.random.default_rng(1)))
    others = [np.asarray(render_digit(images8[3], np.random.default_rng(s))) for s in range(2, 8)]
    assert np.array_equal(a, b)
    assert any(not np.array_equal(a, o) for o in others)


def test_plain_rendering_is_dark_ink_on_light_paper(images8):
    arr = np.asarray(render_digit(images8[0]), dtype=float).mean(axis=2)
    assert arr[0, 0] > 200  # corner: paper
    assert arr.min() < 80  # strokes: ink


def test_styled_rendering_differs_visibly_from_plain(images8):
    plain = np.asarray(render_digit(images8[5]), dtype=float)
    styled = np.asarray(render_digit_styled(images8[5]), dtype=float)
    assert styled.shape == plain.shape
    assert styled.mean() < plain.mean() - 60  # dark background instead of paper
    assert np.abs(styled - plain).mean() > 60


def test_captions_name_the_digit_as_a_word():
    assert caption_for(7) == "a handwritten digit seven"
    assert [caption_for(d).split()[-1] for d in range(10)] == DIGIT_WORDS
    with pytest.raises(ValueError, match="0-9"):
        caption_for(10)


def test_render_refuses_wrong_shapes():
    with pytest.raises(ValueError, match="8x8"):
        render_digit(np.zeros((16, 16)))
