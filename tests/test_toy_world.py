"""The toy world's builders and settings on small settings: the digit classifier builder (saves
only above its accuracy bar), the toy base builder (diffusers folder + training.json), the toy
config (validated apart from production's Params, unknown keys named), the toy source writer
behind `orchestrate.toy_source_if_missing`."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from components.config import ConfigError, Params, load_params
from components.toy import world
from components.toy.config import ToyConfig, parse_toy_config, toy_config
from components.toy.source import ensure_toy_source
from tests.tiny_pipeline import single_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


# --- settings ------------------------------------------------------------------------------------


def test_toy_section_is_opaque_to_production_and_checked_by_the_toy():
    params = load_params("params.yaml")
    assert isinstance(params.toy, dict) and "toy" not in params.merge.model_dump()
    cfg = toy_config(params)
    assert cfg.seed == 0 and cfg.style_rank == 16 and cfg.style_alpha == 8.0 and cfg.style_lr == 2e-3
    assert toy_config(Params()) == ToyConfig()  # every key has a default
    assert toy_config(load_params("params.yaml", ["toy.train_steps=7"])).train_steps == 7


def test_unknown_or_wrong_toy_keys_are_named():
    with pytest.raises(ConfigError, match=r"toy\.trian_steps: unknown key") as err:
        toy_config(load_params("params.yaml", ["toy.trian_steps=7", "toy.style_rank=many"]))
    assert "toy.style_rank" in str(err.value)  # every violation at once
    with pytest.raises(ConfigError, match=r"params.yaml: toy\.seed"):
        parse_toy_config({"seed": "zero"}, source="params.yaml")
    with pytest.raises(ValidationError, match="frozen"):
        ToyConfig().seed = 3  # type: ignore[misc]


def test_style_lora_settings_left_the_merge_section():
    with pytest.raises(ConfigError, match=r"merge\.style_rank: unknown key"):
        load_params("params.yaml", ["merge.style_rank=8"])


# --- builders ------------------------------------------------------------------------------------


def test_classifier_builder_saves_only_above_its_bar(tmp_path, monkeypatch):
    cfg = ToyConfig(classifier_dir=str(tmp_path / "clf"), classifier_epochs=1)
    monkeypatch.setattr(world, "MIN_CLASSIFIER_ACCURACY", 1.01)
    with pytest.raises(ValueError, match="held-out accuracy .* < 1.01; raise toy.classifier_epochs"):
        world.build_digit_classifier(cfg)
    assert not (tmp_path / "clf").exists()
    monkeypatch.setattr(world, "MIN_CLASSIFIER_ACCURACY", 0.0)
    reports = []
    report = world.build_digit_classifier(cfg, progress=reports.append)
    assert report["train_size"] + report["heldout_size"] == 1797 and report["epochs"] == 1
    assert 0.0 <= report["heldout_accuracy_styled"] <= 1.0 and report["heldout_accuracy"] > 0.1
    assert reports and reports[-1].stage == "toy-classifier" and reports[-1].step == reports[-1].total
    saved = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert saved["heldout_accuracy"] == report["heldout_accuracy"]
    classifier = world.load_digit_classifier(tmp_path / "clf")
    assert classifier.meta["epochs"] == 1


@pytest.mark.slow
def test_toy_base_builder_writes_a_diffusers_folder_and_its_record(tmp_path):
    overrides = [f"toy.base_dir={tmp_path / 'base'}", "toy.train_steps=4", "toy.vae_steps=4", "toy.batch_size=8",
                 "toy.vae_batch_size=8", "toy.copies=1", "toy.eval_every=2", "toy.eval_samples=10",
                 "toy.final_eval_samples=10", "toy.final_guidance_scales=[2.0]", "toy.warmup_steps=1"]
    params = load_params("params.yaml", overrides)
    report = world.build_toy_base(params)
    base = tmp_path / "base"
    assert (base / "model_index.json").is_file() and (base / "tokenizer" / "vocab.json").is_file()
    record = json.loads((base / "training.json").read_text())
    assert record["guidance_scale"] == params.bases["toy"].guidance_scale == report["guidance_scale"]
    assert set(report["final_accuracy"]) == {"2"} and 0.0 <= report["final_accuracy"]["2"] <= 1.0
    assert record["params"]["toy"]["train_steps"] == 4 and report["parameters"]["unet"] > 0

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32


# --- the toy source behind orchestrate.toy_source_if_missing ----------------------------------


def test_ensure_toy_source_writes_once_and_only_for_the_toy_folder(tmp_path):
    toy_dir = tmp_path / "source"
    other = load_params("params.yaml", [f"toy.source_dir={toy_dir}", f"curate.source={tmp_path / 'laion'}"])
    assert ensure_toy_source(other) is None and not toy_dir.exists()
    params = load_params("params.yaml", [f"toy.source_dir={toy_dir}", f"curate.source={toy_dir}"])
    summary = ensure_toy_source(params)
    assert summary["output"] == str(toy_dir) and summary["rows"] > 1797 and any(toy_dir.glob("*.parquet"))
    assert ensure_toy_source(params) is None  # present: nothing rewritten
