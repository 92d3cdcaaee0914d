"""The hard toy's `wide` layout (toy.hard.layout): digits anywhere in their half at 18-26 px, threaded
through judges, source and evaluation; the `narrow` default draws exactly what it drew before."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from components.toy.hard.render import (
    DIGIT_BOX,
    HALF,
    HARD_SIZE,
    PAPER,
    WIDE_MIN_BOX,
    Scene,
    random_scene,
    render_scene,
)

DIGITS = load_digits()
# sha256 of 20 jittered renders (seed 3) made by the renderer before the layout option existed (commit 2f9719b)
NARROW_RENDERS_SHA = "05712c4b2653a2d7fea4f69eeee29a6015f51d27e1708f2bdd0fd94937b9645a"


def _ink_box(image: np.ndarray, side: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels far from the paper in one half (inclusive)."""
    half = image[:, side * HALF:(side + 1) * HALF].astype(float)
    ink = np.abs(half - PAPER).max(axis=2) > 60
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


def test_narrow_layout_draws_what_the_renderer_drew_before() -> None:
    rng, digest = np.random.default_rng(3), hashlib.sha256()
    for _ in range(20):
        scene, i, j, _ = random_scene(DIGITS.target, rng)
        digest.update(np.asarray(render_scene(DIGITS.images[i], DIGITS.images[j], scene, rng)).tobytes())
    assert digest.hexdigest() == NARROW_RENDERS_SHA


def test_wide_layout_moves_and_scales_digits_within_their_half() -> None:
    rng = np.random.default_rng(0)
    eight = DIGITS.images[np.flatnonzero(DIGITS.target == 8)[0]]  # an eight inks most of its box
    tops, heights = [], []
    for _ in range(150):
        image = np.asarray(render_scene(eight, eight, Scene(8, 0, 8, 2), rng, layout="wide"))
        for side in (0, 1):
            top, bottom, left, right = _ink_box(image, side)
            assert 0 <= left and right < HALF  # each digit stays in its own half
            tops.append(top)
            heights.append(bottom - top + 1)
    assert min(tops) <= 4 and max(tops) >= HARD_SIZE - DIGIT_BOX - 4  # top to bottom of the image
    assert max(heights) - min(heights) >= 5  # sizes vary (boxes 18-26 px)
    assert max(heights) <= DIGIT_BOX
    narrow = np.random.default_rng(0)
    narrow_tops = [_ink_box(np.asarray(render_scene(eight, eight, Scene(8, 0, 8, 2), narrow)), 0)[0]
                   for _ in range(50)]
    assert max(narrow_tops) - min(narrow_tops) <= 12  # the narrow layout's +-6 px
    assert WIDE_MIN_BOX < DIGIT_BOX


def test_canonical_render_is_the_same_in_both_layouts_and_unknown_layouts_fail() -> None:
    seven, two = DIGITS.images[7], DIGITS.images[2]
    scene = Scene(7, 0, 2, 2)
    assert np.array_equal(np.asarray(render_scene(seven, two, scene)),
                          np.asarray(render_scene(seven, two, scene, layout="wide")))
    with pytest.raises(ValueError, match="layout must be one of"):
        render_scene(seven, two, scene, np.random.default_rng(0), layout="diagonal")


def test_layout_reaches_the_source_summary_and_a_stale_source_is_refused(tmp_path) -> None:
    from components.config import load_params
    from components.toy.hard.source import source_settings, write_hard_source
    from components.toy.source import check_source_settings

    summary = write_hard_source(tmp_path / "src", rows=500, seed=1, layout="wide")
    assert summary["layout"] == "wide"
    assert json.loads((tmp_path / "src" / "toy_summary.json").read_text())["layout"] == "wide"
    narrow = load_params("params.yaml", ["toy.hard.source_rows=500", "toy.hard.seed=1"])
    with pytest.raises(ValueError, match="layout 'wide' \\(asked: 'narrow'\\)"):
        check_source_settings(tmp_path / "src", source_settings(narrow))
    wide = load_params("params.yaml", ["toy.hard.source_rows=500", "toy.hard.seed=1", "toy.hard.layout=wide"])
    check_source_settings(tmp_path / "src", source_settings(wide))


def test_judges_record_their_layout_and_evaluation_refuses_another(tmp_path) -> None:
    from components.toy.hard.config import HardToyConfig
    from components.toy.hard.evaluate import evaluate_base
    from components.toy.hard.judges import HalfNet, HardJudges, load_judges, save_judges

    save_judges(HardJudges(HalfNet()), tmp_path / "j", {"layout": "wide"})
    assert load_judges(tmp_path / "j").layout == "wide"
    save_judges(HardJudges(HalfNet()), tmp_path / "old", {})
    assert load_judges(tmp_path / "old").layout == "narrow"  # judges from before the option
    s = HardToyConfig(judges_dir=str(tmp_path / "j"), base_dir="data/toy/hard/base")
    with pytest.raises(ValueError, match="judges trained on the wide layout, toy.hard.layout is narrow"):
        evaluate_base(s)


def test_style_set_records_its_layout_and_a_style_lora_refuses_another(tmp_path) -> None:
    from components.toy.hard.style import STYLE_SET_SETTINGS, read_hard_style, write_hard_style

    folder = write_hard_style(tmp_path / "wide", count=4, seed=3, layout="wide")
    assert json.loads((folder / STYLE_SET_SETTINGS).read_text()) == {"count": 4, "seed": 3, "layout": "wide",
                                                                   "style": "blue-ruled"}
    images, captions = read_hard_style(folder, "wide")
    assert images.shape == (4, 3, HARD_SIZE, HARD_SIZE) and len(captions) == 4
    with pytest.raises(ValueError, match="a hard style set of the wide layout, toy.hard.layout is narrow"):
        read_hard_style(folder, "narrow")
    narrow = write_hard_style(tmp_path / "narrow", count=4, seed=3)
    assert not np.array_equal(images.numpy(), read_hard_style(narrow, "narrow")[0].numpy())  # other places
    (narrow / STYLE_SET_SETTINGS).unlink()  # a set written before settings.json: narrow scenes
    read_hard_style(narrow, "narrow")
    with pytest.raises(ValueError, match="of the narrow layout, toy.hard.layout is wide"):
        read_hard_style(narrow, "wide")
    read_hard_style(narrow, "narrow", count=4, seed=0)  # the old set: its rows' count, seed 0
    with pytest.raises(ValueError, match="written with seed 0, toy.hard.style_seed is 3"):
        read_hard_style(narrow, "narrow", count=4, seed=3)


def test_style_set_of_another_count_or_seed_is_refused_by_name(tmp_path) -> None:
    from components.toy.hard.style import read_hard_style, write_hard_style

    folder = write_hard_style(tmp_path / "set", count=3, seed=5)
    assert len(read_hard_style(folder, "narrow", count=3, seed=5)[1]) == 3
    with pytest.raises(ValueError, match="written with count 3, toy.hard.style_count is 4"):
        read_hard_style(folder, "narrow", count=4, seed=5)
    with pytest.raises(ValueError, match="written with seed 5, toy.hard.style_seed is 0"):
        read_hard_style(folder, count=3, seed=0)
    with pytest.raises(ValueError, match="of the narrow layout, toy.hard.layout is wide; written with count 3, "
                                         "toy.hard.style_count is 2000; written with seed 5, toy.hard.style_seed is 0"):
        read_hard_style(folder, "wide", count=2000, seed=0)


def test_style_metric_renders_follow_the_layout_and_still_separate() -> None:
    from components.toy.hard.style_metric import hard_style_metric, hard_style_renders

    plain, styled = hard_style_renders(60, seed=9, layout="wide")
    narrow_plain, _ = hard_style_renders(60, seed=9)
    assert not torch.equal(plain, narrow_plain)
    # the same scenes and jitter plain and styled: where the plain render has ink, so has the styled one
    ink = (plain.mean(dim=1) < 0.0)  # digits are dark ink on light paper
    assert ink.any() and (styled.mean(dim=1)[ink] < 0.2).float().mean() > 0.95
    metric = hard_style_metric(count=150, seed=0, layout="wide")
    assert metric.separation == 1.0
    assert abs(metric.mean_strength(plain)) < 0.1 and abs(metric.mean_strength(styled) - 1.0) < 0.1
