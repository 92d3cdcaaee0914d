"""Evaluation end to end on a tiny random pipeline and a random LoRA: the metrics document, the
files it writes, and `lcmlora evaluate` on a real-base configuration (local TorchScript
features, local CLIP, reference image folder) with its exit status following the gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from components.config import ConfigError, EvaluateConfig
from components.evaluate.evaluation import evaluate_lora, write_evaluation
from components.evaluate.judges import Judges, real_judges
from tests.tiny_pipeline import (
    random_lora_folder,
    single_thread,
    tiny_clip_folder,
    tiny_sd_pipeline,
    torchscript_extractor,
)

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

PROMPTS = ["a handwritten digit one", "a handwritten digit two", "a handwritten digit three"]


def grey_features(images: torch.Tensor) -> torch.Tensor:
    """A stand-in backbone: 4x4 average-pooled grey pixels (16 features)."""
    return torch.nn.functional.adaptive_avg_pool2d(images.mean(dim=1, keepdim=True), 4).flatten(1)


def brightness(images: torch.Tensor, prompts: list[str]) -> float:
    """A stand-in adherence: mean brightness on [0, 1]."""
    assert len(prompts) == images.shape[0]
    return float((images.mean() + 1) / 2)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluation")
    pipe = tiny_sd_pipeline(tmp)
    lora = random_lora_folder(pipe, tmp / "lora")
    (lora / "metrics.json").write_text(json.dumps({"train": {"final_loss": 0.01}}))
    cfg = EvaluateConfig(steps=[1, 2, 4], teacher_steps=[50], samples_per_prompt=2, batch_size=6, lcm1_psnr_min=1000.0)
    g = torch.Generator().manual_seed(0)
    judges = Judges(grey_features, "grey 4x4", brightness, "brightness", torch.rand(40, 3, 32, 32, generator=g) * 2 - 1)
    evaluation = evaluate_lora(pipe, lora, cfg, judges, PROMPTS, base_name="tiny", teacher_guidance=2.0, resolution=32)
    paths = write_evaluation(evaluation, tmp / "out", lora)
    return evaluation, paths, lora


def test_metrics_document(evaluated):
    evaluation, _, _ = evaluated
    doc = evaluation.doc
    labels = [m["label"] for m in doc["methods"]]
    assert labels == ["lcm-1", "lcm-2", "lcm-4", "ddim-1", "ddim-2", "ddim-4", "ddim-50",
                      "dpmpp-1", "dpmpp-2", "dpmpp-4", "dpmpp-50"]
    rows = {m["label"]: m for m in doc["methods"]}
    assert all(np.isfinite(m["fd"]) and m["fd"] >= 0 and 0 <= m["adherence"] <= 1 for m in doc["methods"])
    assert rows["ddim-50"]["psnr"] is None and rows["ddim-50"]["ssim"] is None  # the agreement reference itself
    assert all(isinstance(rows[k]["psnr"], float) and -1 <= rows[k]["ssim"] <= 1 for k in labels if k != "ddim-50")
    assert rows["lcm-4"]["unet_evals_per_image"] == 4 and rows["dpmpp-50"]["unet_evals_per_image"] == 100
    assert doc["info"]["images_per_method"] == 6 and doc["info"]["agreement_reference"] == "ddim-50"
    # The gate ran every threshold; the impossible PSNR minimum is among the violations.
    assert [c["key"] for c in doc["gate"]["checks"]] == [
        "evaluate.lcm4_fd_max_ratio_to_teacher50", "evaluate.lcm4_fd_below_dpm4",
        "evaluate.adherence_min_ratio", "evaluate.lcm1_psnr_min"]
    assert not doc["gate"]["passed"]
    assert any(v.startswith("evaluate.lcm1_psnr_min: lcm-1 psnr") for v in doc["gate"]["violations"])
    assert len(evaluation.grid_images) == len(labels) and evaluation.grid_images[0].shape == (3, 3, 32, 32)


def test_files_in_output_and_lora_folder(evaluated):
    evaluation, paths, lora = evaluated
    out = paths["metrics.json"].parent
    written = json.loads((out / "metrics.json").read_text())
    assert written["gate"] == evaluation.doc["gate"] and len(written["methods"]) == 11
    merged = json.loads((lora / "metrics.json").read_text())
    assert merged["train"] == {"final_loss": 0.01}  # what distillation wrote is kept
    assert merged["gate"] == evaluation.doc["gate"] and merged["evaluation"]["methods"] == written["methods"]
    for name in ("report.md", "report.html", "samples.png", "metrics_vs_steps.png"):
        assert (out / name).stat().st_size > 0 and (lora / "evaluation" / name).stat().st_size > 0
    with Image.open(out / "samples.png") as grid:
        assert grid.size[1] == 11 * (64 + 2)  # one row per method


def test_real_base_without_backbones_names_the_params_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate.feature_extractor is not set"):
        real_judges(EvaluateConfig(), resolution=32)
    extractor = str(torchscript_extractor(tmp_path / "features.pt"))
    with pytest.raises(FileNotFoundError, match="evaluate.clip_model is not set"):
        real_judges(EvaluateConfig(feature_extractor=extractor), resolution=32)
    tiny_clip_folder(tmp_path / "clip")
    with pytest.raises(ConfigError, match="evaluate.reference_images is not set"):
        real_judges(EvaluateConfig(feature_extractor=extractor, clip_model=str(tmp_path / "clip")), resolution=32)


# --- the CLI on a real-base configuration -----------------------------------------------------


@pytest.fixture(scope="module")
def real_base_params(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    pipe = tiny_sd_pipeline(tmp)
    lora = random_lora_folder(pipe, tmp / "lora")
    pipe.save_pretrained(tmp / "base", safe_serialization=True)
    tiny_clip_folder(tmp / "clip")
    refs = tmp / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(refs / f"{i}.png")
    (tmp / "prompts.txt").write_text("# two prompts\na red car\na blue house\n")
    params = {
        "bases": {"tiny": {"reference": str(tmp / "base"), "family": "sd15", "resolution": 32, "guidance_scale": 2.0}},
        "evaluate": {"steps": [1, 4], "teacher_steps": [50], "samples_per_prompt": 2, "batch_size": 4,
                     "prompts": str(tmp / "prompts.txt"), "reference_images": str(refs),
                     "feature_extractor": str(torchscript_extractor(tmp / "features.pt")),
                     "clip_model": str(tmp / "clip")},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp, lora


def _invoke(args: list[str]):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, args)


def test_cli_evaluate_exits_non_zero_on_a_failed_gate(real_base_params, monkeypatch):
    tmp, lora = real_base_params
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp / "out"
    result = _invoke(["evaluate", "--params", str(tmp / "params.yaml"), "--base", "tiny", "--lora", str(lora),
                      "--output", str(out), "--set", "evaluate.lcm1_psnr_min=1000"])
    assert result.exit_code == 1, result.output
    assert "gate: FAILED" in result.output and "evaluate.lcm1_psnr_min" in result.output
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["info"]["feature_backbone"] == "TorchScript features.pt" and doc["info"]["adherence"] == "CLIP score"
    assert doc["info"]["reference_images"] == 12 and doc["info"]["prompts"] == 2
    assert doc["gate"]["passed"] is False
    assert json.loads((out / "lora" / "metrics.json").read_text())["gate"] == doc["gate"]  # the judged copy


def test_cli_evaluate_exits_zero_when_the_gate_passes(real_base_params, monkeypatch):
    tmp, lora = real_base_params
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = _invoke(["evaluate", "--params", str(tmp / "params.yaml"), "--base", "tiny", "--lora", str(lora),
                      "--output", str(tmp / "out2"), "--set", "evaluate.steps=[1]", "--set", "evaluate.teacher_steps=[]",
                      "--set", "evaluate.lcm4_fd_max_ratio_to_teacher50=null", "--set", "evaluate.lcm4_fd_below_dpm4=false",
                      "--set", "evaluate.adherence_min_ratio=null", "--set", "evaluate.lcm1_psnr_min=-1000",
                      "--set", "evaluate.agreement_reference=ddim-1"])
    assert result.exit_code == 0, result.output
    assert "gate: passed" in result.output


def test_cli_evaluate_without_a_feature_extractor_fails_naming_the_key(real_base_params, monkeypatch):
    tmp, lora = real_base_params
    result = _invoke(["evaluate", "--params", str(tmp / "params.yaml"), "--base", "tiny", "--lora", str(lora),
                      "--output", str(tmp / "out3"), "--set", "evaluate.feature_extractor=null"])
    assert result.exit_code != 0
    assert "evaluate.feature_extractor is not set" in str(result.exception)


def test_flat_metrics_for_dvc_beside_metrics_json(evaluated):
    from components.evaluate.flat_metrics import FLAT_METRICS_NAME

    evaluation, paths, _ = evaluated
    flat = json.loads((paths["metrics.json"].parent / FLAT_METRICS_NAME).read_text())
    lcm4 = next(m for m in evaluation.doc["methods"] if m["label"] == "lcm-4")
    assert flat["lcm-4.fd"] == pytest.approx(lcm4["fd"]) and flat["lcm-4.adherence"] == pytest.approx(lcm4["adherence"])
    assert flat["lcm-1.psnr"] > 0 and "lcm-1.ssim" in flat
    assert flat["gate.passed"] == 0  # lcm1_psnr_min=1000 fails the gate
    assert all(isinstance(v, int | float) for v in flat.values()), "flat scalars only: DVC drops lists"


def test_a_pcm_lora_is_sampled_and_gated_on_its_own_rows_with_cfg_rows(tmp_path):
    from safetensors.torch import load_file, save_file

    from components.lora.formats import LORA_WEIGHT_NAME, read_metadata
    from components.lora.objective import objective_metadata, recipe

    pipe = tiny_sd_pipeline(tmp_path)
    lora = random_lora_folder(pipe, tmp_path / "lora")
    weights = lora / LORA_WEIGHT_NAME
    trained = recipe("pcm", 2, [999, 479])
    save_file(load_file(weights), str(weights), metadata={**read_metadata(weights), **objective_metadata(trained)})
    (tmp_path / "neg.txt").write_text("a blurry digit\n")
    cfg = EvaluateConfig(steps=[2, 4], teacher_steps=[], teacher_samplers=["dpmpp"], samples_per_prompt=1,
                         batch_size=3, gate_teacher_steps=4, cfg_scales=[3.0], negative_prompts=str(tmp_path / "neg.txt"))
    judges = Judges(grey_features, "grey 4x4", brightness, "brightness", torch.rand(20, 3, 32, 32) * 2 - 1)
    doc = evaluate_lora(pipe, lora, cfg, judges, PROMPTS, base_name="tiny", teacher_guidance=2.0, resolution=32).doc
    rows = {row["label"]: row for row in doc["methods"]}
    assert list(rows) == ["pcm-2", "pcm-4", "pcm-4-cfg3", "dpmpp-2", "dpmpp-4"]
    assert rows["pcm-4"]["unet_evals_per_image"] == 4.0 and rows["pcm-4-cfg3"]["unet_evals_per_image"] == 8.0
    assert doc["info"]["objective"] == "pcm" and doc["info"]["pcm_phases"] == 2
    assert doc["gate"]["checks"] and all(c["rule"].startswith("pcm-4 ") for c in doc["gate"]["checks"])
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        (tmp_path / "neg.txt").write_text("one\ntwo\n")
        evaluate_lora(pipe, lora, cfg, judges, PROMPTS, base_name="tiny", teacher_guidance=2.0, resolution=32)
