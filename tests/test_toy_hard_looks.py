"""`toy.hard.look_fraction`: the hard source drawn partly on other papers (render.random_look), none of
them the hard style's, and with 0 the very same source as before."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.toy.hard.render import PAPER, pil_to_tensor_array, random_scene, render_scene
from components.toy.hard.source import write_hard_source
from tests.test_toy_hard import _digest


def _corner_colours(folder: Path) -> list[np.ndarray]:
    """The top-left 4x4 pixels' mean colour of every readable image in the first shard (paper only:
    the digits never reach the corner)."""
    out = []
    with tarfile.open(folder / "00000.tar") as tar:
        for member in tar.getmembers():
            if not member.name.endswith(".jpg"):
                continue
            try:
                image = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"), float)
            except OSError:  # the source's corrupt-image defect
                continue
            out.append(image[:4, :4].reshape(-1, 3).mean(0))
    return out


def test_zero_look_fraction_is_the_plain_source_and_half_draws_other_papers(tmp_path):
    plain = write_hard_source(tmp_path / "plain", rows=500, seed=3)
    zero = write_hard_source(tmp_path / "zero", rows=500, seed=3, look_fraction=0.0)
    assert _digest(tmp_path / "plain") == _digest(tmp_path / "zero") and plain["other_looks"] == 0

    half = write_hard_source(tmp_path / "half", rows=500, seed=3, look_fraction=0.5)
    assert half["rows"] == zero["rows"] and half["expected_curated"] == zero["expected_curated"]
    assert 170 <= half["other_looks"] <= 330  # about half of the ~500 rendered images
    summary = json.loads((tmp_path / "half" / "toy_summary.json").read_text())
    assert summary["other_looks"] == half["other_looks"] and summary["look_fraction"] == 0.5
    # the same captions (scenes) in the same order: only the papers differ
    def captions(folder):
        with tarfile.open(folder / "00000.tar") as tar:
            return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert captions(tmp_path / "half") == captions(tmp_path / "zero")
    # plain paper is within 10 per channel of PAPER (render jitter) plus JPEG; other papers are not
    far = [np.abs(c - PAPER).max() > 16 for c in _corner_colours(tmp_path / "half")]
    assert 0.3 < np.mean(far) < 0.7
    assert not any(np.abs(c - PAPER).max() > 16 for c in _corner_colours(tmp_path / "zero"))

    with pytest.raises(ValueError, match="look_fraction"):
        write_hard_source(tmp_path / "bad", rows=500, look_fraction=1.5)


def test_other_looks_are_not_the_hard_style():
    """The hard style metric (plain 0, style 1) reads the other papers near plain: distilling on them
    teaches no part of the style the merge claim measures."""
    from components.toy.classifier import load_sklearn_digits
    from components.toy.hard.render import random_look
    from components.toy.hard.style_metric import hard_style_metric

    metric = hard_style_metric()
    images8, labels = load_sklearn_digits()
    rng = np.random.default_rng(5)
    looks = []
    for _ in range(200):
        scene, i, j, _ = random_scene(labels, rng)
        looks.append(pil_to_tensor_array(render_scene(images8[i], images8[j], scene, rng, background=random_look(rng))))
    strengths = metric.strength(torch.from_numpy(np.stack(looks)))
    assert abs(float(strengths.mean())) < 0.25 and float(strengths.max()) < 0.6, strengths


def test_a_reproduction_refuses_a_source_written_with_other_settings(tmp_path):
    """`lcmlora reproduce --toy --hard` writes its source once; an existing one written with another
    look fraction (or seed, or size) is refused by name, before anything is curated from it."""
    from components.config import load_params
    from components.toy.hard.reproduction import hard_overrides, hard_world
    from components.toy.reproduction import run_reproduction
    from components.toy.source import check_source_settings

    repo = Path(__file__).resolve().parents[1]
    write_hard_source(tmp_path / "source", rows=500, seed=0)
    world = hard_world("sd15")

    def params(*extra):
        return load_params(repo / "params.yaml", hard_overrides("sd15") + [
            f"curate.source={tmp_path / 'source'}", f"storage.root={tmp_path / 'artifacts'}",
            "toy.hard.source_rows=500", *extra])

    check_source_settings(tmp_path / "source", world.source_settings(params()))  # the same settings: read
    with pytest.raises(ValueError, match=r"look_fraction 0\.0 \(asked: 0\.5\)"):
        run_reproduction(world, params("toy.hard.look_fraction=0.5"), tmp_path / "out")
    with pytest.raises(ValueError, match="seed 0 \\(asked: 3\\)"):
        run_reproduction(world, params("toy.hard.seed=3"), tmp_path / "out")
    assert not (tmp_path / "artifacts").exists()  # nothing curated

    # a summary from before look_fraction existed is a plain source
    summary = json.loads((tmp_path / "source" / "toy_summary.json").read_text())
    del summary["look_fraction"]
    (tmp_path / "source" / "toy_summary.json").write_text(json.dumps(summary))
    check_source_settings(tmp_path / "source", world.source_settings(params()))
    with pytest.raises(ValueError, match="look_fraction"):
        check_source_settings(tmp_path / "source", world.source_settings(params("toy.hard.look_fraction=0.25")))


def test_the_nightlys_source_writer_refuses_a_source_written_with_other_settings(tmp_path):
    """The `toy-hard` source writer (lcmlora.sources, run before curation by the nightly and new-base
    flows) writes the hard source once and then refuses one written with other settings, as the
    reproduction does, instead of curating a stale source."""
    from components.config import load_params
    from components.toy.hard.plugins import ensure_hard_source

    repo = Path(__file__).resolve().parents[1]
    folder = tmp_path / "source"

    def params(*extra):
        return load_params(repo / "params.yaml", [f"toy.hard.source_dir={folder}", f"curate.source={folder}",
                                                  "toy.hard.source_rows=500", "toy.hard.seed=0", *extra])

    written = ensure_hard_source(params())
    assert written is not None and written["output"] == str(folder) and any(folder.glob("*.parquet"))
    before = _digest(folder)
    assert ensure_hard_source(params()) is None and _digest(folder) == before  # the same settings: kept
    with pytest.raises(ValueError, match=r"look_fraction 0\.0 \(asked: 0\.5\)"):
        ensure_hard_source(params("toy.hard.look_fraction=0.5"))
    with pytest.raises(ValueError, match=r"scenes 500 \(asked: 600\)"):
        ensure_hard_source(params("toy.hard.source_rows=600"))
    assert _digest(folder) == before
    # another curate.source is not the hard toy's: nothing is written or checked
    assert ensure_hard_source(params("toy.hard.seed=3", f"curate.source={tmp_path / 'elsewhere'}")) is None
