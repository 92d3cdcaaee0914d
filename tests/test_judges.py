"""Judges: the providers installed as entry points (group lcmlora.judges) and found by the name
a base gives (`bases.NAME.judges`); the real judges from local files; the toy's digit judges.

These use the real installed entry points: after a change to pyproject.toml's entry points,
reinstall the project (`pip install -e .`) so importlib.metadata sees them."""

from __future__ import annotations

from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import BaseConfig, ConfigError, EvaluateConfig, load_params
from components.evaluate.evaluation import load_prompts
from components.evaluate.judges import JUDGES_GROUP, SD_PROMPTS, Judges, load_judges, real_judges
from components.plugins import installed, load_plugin
from components.toy.judges import (
    TOY_PROMPTS,
    digit_accuracy_from_logits,
    digit_accuracy_metric,
    digit_label,
    toy_judges,
)
from tests.tiny_pipeline import single_thread, tiny_clip_folder, torchscript_extractor

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


# --- providers through the installed entry points --------------------------------------------------


def test_real_and_toy_providers_are_installed_entry_points():
    points = {ep.name: ep.value for ep in entry_points(group=JUDGES_GROUP)}
    assert points["real"] == "components.evaluate.judges:real_judges"
    assert points["toy"] == "components.toy.judges:toy_judges"
    assert load_plugin(JUDGES_GROUP, "real", "k") is real_judges
    assert load_plugin(JUDGES_GROUP, "toy", "k") is toy_judges
    sources = {ep.name: ep.value for ep in entry_points(group="lcmlora.sources")}
    assert sources["toy"] == "components.toy.source:ensure_toy_source"


def test_unknown_provider_names_the_key_and_the_installed_names():
    base = BaseConfig(reference="x", family="sd15", judges="inception-v9")
    with pytest.raises(ConfigError, match=r"bases\.mine\.judges='inception-v9'.*lcmlora\.judges") as err:
        load_judges(EvaluateConfig(), base, "mine")
    assert f"installed: {', '.join(installed(JUDGES_GROUP))}" in str(err.value)
    assert {"real", "toy"} <= set(installed(JUDGES_GROUP))


def test_base_judges_come_from_params_not_the_path():
    params = load_params("params.yaml")
    assert params.bases["toy"].judges == "toy"
    assert BaseConfig(reference="data/toy/base", family="sd15").judges == "real"  # never guessed from the path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Judges:
    params = load_params("params.yaml")
    return load_judges(params.evaluate, params.bases["toy"], "toy")


def test_toy_provider_through_load_judges(toy):
    from components.toy.render import caption_for
    from components.toy.style_metric import toy_renders

    assert (toy.backbone_name, toy.adherence_name) == ("digit classifier features", "digit accuracy")
    assert toy.reference_images.shape == (1797, 3, 32, 32)
    assert -1.0 <= float(toy.reference_images.min()) and float(toy.reference_images.max()) <= 1.0
    assert toy.default_prompts == TOY_PROMPTS and len(load_prompts(toy.default_prompts)) >= 10
    # The digit classifier reads the toy's own renderings: features per image, high digit accuracy.
    from sklearn.datasets import load_digits

    labels = load_digits().target
    features = toy.backbone(toy.reference_images[:50])
    assert features.shape == (50, 64) and torch.isfinite(features).all()
    right = [caption_for(int(d)) for d in labels[:200]]
    wrong = [caption_for(int(d + 1) % 10) for d in labels[:200]]
    assert toy.adherence(toy.reference_images[:200], right) > 0.9
    assert toy.adherence(toy.reference_images[:200], wrong) < 0.1
    # Style: plain renderings score about 0, styled about 1.
    plain, styled = toy_renders(100, seed=3)
    assert toy.style is not None and toy.style_name.startswith("toy style strength")
    assert abs(toy.style.mean_strength(plain)) < 0.2 and abs(toy.style.mean_strength(styled) - 1) < 0.2


def test_toy_provider_takes_a_reference_folder_when_set(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    judges = toy_judges(EvaluateConfig(reference_images=str(tmp_path)), resolution=16)
    assert judges.reference_images.shape == (3, 3, 16, 16)


# --- the real judges -------------------------------------------------------------------------------


def test_real_provider_through_load_judges(tmp_path):
    extractor = str(torchscript_extractor(tmp_path / "features.pt"))
    tiny_clip_folder(tmp_path / "clip")
    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(refs / f"{i}.jpg")
    (refs / "notes.txt").write_text("not an image")
    cfg = EvaluateConfig(feature_extractor=extractor, clip_model=str(tmp_path / "clip"), reference_images=str(refs))
    judges = load_judges(cfg, BaseConfig(reference="x", family="sd15", resolution=32), "real-base")
    assert (judges.backbone_name, judges.adherence_name) == ("TorchScript features.pt", "CLIP score")
    assert judges.reference_images.shape == (4, 3, 32, 32) and judges.style is None
    assert judges.default_prompts == SD_PROMPTS
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert judges.backbone(images).shape[0] == 3
    assert 0.0 <= judges.adherence(images, ["a red car", "a cat", "a house"]) <= 100.0


def test_real_judges_name_each_missing_params_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate.feature_extractor is not set"):
        real_judges(EvaluateConfig(), resolution=32)
    extractor = str(torchscript_extractor(tmp_path / "features.pt"))
    with pytest.raises(FileNotFoundError, match="evaluate.clip_model is not set"):
        real_judges(EvaluateConfig(feature_extractor=extractor), resolution=32)
    tiny_clip_folder(tmp_path / "clip")
    with pytest.raises(ConfigError, match="evaluate.reference_images is not set"):
        real_judges(EvaluateConfig(feature_extractor=extractor, clip_model=str(tmp_path / "clip")), resolution=32)
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    with pytest.raises(FileNotFoundError, match="evaluate.reference_images=.*at least 2 images"):
        real_judges(EvaluateConfig(feature_extractor=extractor, clip_model=str(tmp_path / "clip"),
                                   reference_images=str(tmp_path / "one")), resolution=32)


# --- the toy's digit accuracy (moved from test_adherence) ------------------------------------------


def test_digit_label_reads_the_digit_word():
    assert digit_label("a handwritten digit seven") == 7
    assert digit_label("A handwritten digit Zero in neon style") == 0
    with pytest.raises(ValueError, match="names no digit"):
        digit_label("a photo of a cat")


def test_digit_accuracy_from_logits():
    logits = torch.eye(10)[[3, 1, 4, 1, 5]]
    assert digit_accuracy_from_logits(logits, torch.tensor([3, 1, 4, 0, 0])) == pytest.approx(0.6)


class _BrightnessClassifier:
    """A judge whose verdict is known: brightness bins -> digit (0 dark ... 9 bright)."""

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        level = ((images.mean(dim=(1, 2, 3)) + 1) / 2 * 9.999).long().clamp(0, 9)
        return torch.nn.functional.one_hot(level, 10).float()


def test_digit_accuracy_metric_pairs_images_with_their_prompts():
    images = torch.stack([torch.full((3, 8, 8), v) for v in (-0.99, 0.99, 0.0)])  # digits 0, 9, 5
    metric = digit_accuracy_metric(classifier=_BrightnessClassifier())
    prompts = ["a handwritten digit zero", "a handwritten digit nine", "a handwritten digit two"]
    assert metric(images, prompts) == pytest.approx(2 / 3)
