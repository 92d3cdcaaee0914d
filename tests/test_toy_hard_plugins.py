"""The hard toy's plug-ins: the `toy-hard` judges (adherence parser, adherence on real renders,
prompt-matched references) and the `toy-hard` source writer, reached as production reaches them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import ConfigError, EvaluateConfig, load_params
from components.evaluate.evaluation import load_prompts
from components.plugins import load_plugin
from components.toy.hard.plugins import (
    HARD_PROMPTS,
    REFERENCES_PER_PROMPT,
    hard_adherence_metric,
    hard_reference_images,
    scene_for_prompt,
)
from components.toy.hard.render import Scene, caption_for, pil_to_tensor_array, render_scene

ROOT = Path(__file__).resolve().parents[1]
JUDGES_DIR = ROOT / "data/toy/hard/judges"


def test_parser_reads_both_word_orders():
    scene = Scene(7, 0, 2, 2)
    assert scene_for_prompt("a red seven on the left and a blue two on the right") == scene
    assert scene_for_prompt("a blue two on the right and a red seven on the left") == scene
    for parts in [(0, 3, 9, 1), (4, 1, 4, 1), (8, 2, 1, 0)]:
        for right_first in (False, True):
            assert scene_for_prompt(caption_for(Scene(*parts), right_first)) == Scene(*parts)


@pytest.mark.parametrize("prompt", [
    "a handwritten digit seven",  # an easy-toy prompt
    "a red seven on the left and a blue two on the left",  # both parts on one side
    "a purple seven on the left and a blue two on the right",  # no such colour
    "a red seven on the left",  # one part only
])
def test_parser_rejects_a_prompt_that_names_no_scene(prompt):
    with pytest.raises(ValueError, match="names no hard toy scene") as err:
        scene_for_prompt(prompt)
    assert repr(prompt) in str(err.value)


def test_prompt_file_covers_every_digit_and_colour_on_both_sides_in_both_orders():
    prompts = load_prompts(HARD_PROMPTS)
    scenes = [scene_for_prompt(p) for p in prompts]
    assert len(prompts) == 40 == len(set(prompts))
    for side in (0, 2):
        assert {s.parts()[side] for s in scenes} == set(range(10))
        assert {s.parts()[side + 1] for s in scenes} == set(range(4))
    assert {p.split(" on the ")[1].split()[0] for p in prompts} == {"left", "right"}  # which part comes first


def _typical_renders(prompts: list[str]) -> torch.Tensor:
    """Each prompt's scene, canonical (no jitter), drawn with the most typical sklearn image of each
    named digit (the one nearest its class mean; some single images are ambiguous even to a person)."""
    from components.toy.classifier import load_sklearn_digits

    images8, labels = load_sklearn_digits()
    typical = []
    for d in range(10):
        members = np.flatnonzero(labels == d)
        mean = images8[members].mean(axis=0)
        typical.append(int(members[np.argmin(((images8[members] - mean) ** 2).sum(axis=(1, 2)))]))
    arrays = []
    for prompt in prompts:
        s = scene_for_prompt(prompt)
        arrays.append(pil_to_tensor_array(render_scene(images8[typical[s.left_digit]],
                                                       images8[typical[s.right_digit]], s)))
    return torch.from_numpy(np.stack(arrays))


def test_adherence_is_one_on_real_renders_and_low_on_mismatched_prompts():
    from components.toy.hard.judges import load_judges

    metric = hard_adherence_metric(load_judges(JUDGES_DIR))
    prompts = load_prompts(HARD_PROMPTS)
    images = _typical_renders(prompts)
    assert metric(images, prompts) == 1.0
    assert metric(images, prompts[1:] + prompts[:1]) <= 0.05  # each image judged against another prompt
    swapped = [caption_for(Scene(s.right_digit, s.right_colour, s.left_digit, s.left_colour))
               for s in map(scene_for_prompt, prompts)]  # the same two parts, sides swapped
    assert metric(images, swapped) <= 0.05
    # the jittered references, rendered as the source renders, read as their prompts too
    reference = hard_reference_images(prompts, per_prompt=2, seed=3)
    assert metric(reference, [p for p in prompts for _ in range(2)]) >= 0.95


def test_references_are_jittered_renders_of_each_prompts_scene():
    prompts = load_prompts(HARD_PROMPTS)[:3]
    reference = hard_reference_images(prompts, per_prompt=4, seed=0)
    assert reference.shape == (12, 3, 64, 64) and -1.0 <= reference.min() and reference.max() <= 1.0
    assert not torch.equal(reference[0], reference[1])  # jitter and different digit images
    assert torch.equal(reference, hard_reference_images(prompts, per_prompt=4, seed=0))  # seeded


def test_toy_hard_judges_entry_point_builds_the_judges():
    provider = load_plugin("lcmlora.judges", "toy-hard", "bases.toy-hard.judges")
    assert provider.problems(EvaluateConfig()) == []
    judges = provider(EvaluateConfig(), 64)
    assert judges.default_prompts == HARD_PROMPTS
    assert judges.reference_images.shape == (40 * REFERENCES_PER_PROMPT, 3, 64, 64)
    assert judges.backbone(judges.reference_images[:3]).shape == (3, 128)
    assert judges.style is not None  # the hard style strength (style_metric.py)


def test_toy_hard_source_entry_point_writes_the_hard_source_once(tmp_path):
    writer = load_plugin("lcmlora.sources", "toy-hard", "test")
    folder = tmp_path / "hard-source"
    params = load_params(ROOT / "params.yaml", [f"curate.source={folder}", f"toy.hard.source_dir={folder}",
                                                "toy.hard.source_rows=500", "toy.hard.seed=3"])
    summary = writer(params)
    assert summary["output"] == str(folder) and summary["rows"] == 560  # 500 scenes + 60 duplicates
    assert (folder / "metadata.parquet").is_file() and len(summary["sizes"]) >= 8
    assert writer(params) is None  # written once
    elsewhere = load_params(ROOT / "params.yaml", [f"curate.source={tmp_path / 'other'}",
                                                   f"toy.hard.source_dir={tmp_path / 'unused'}"])
    assert writer(elsewhere) is None and not (tmp_path / "unused").exists()  # only the hard toy's folder


def test_a_typo_under_toy_hard_is_named():
    from components.toy.hard.config import hard_toy_config

    with pytest.raises(ConfigError, match=r"toy\.hard\.trian_steps: unknown key"):
        hard_toy_config(load_params(ROOT / "params.yaml", ["toy.hard.trian_steps=5"]))
    assert hard_toy_config(load_params(ROOT / "params.yaml", ["toy.hard.train_steps=5"])).train_steps == 5
