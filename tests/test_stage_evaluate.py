"""The evaluate stage runner: a saved tiny base and a random LoRA, judges from the base's provider
(the real one, through its entry point) or given; the output record, the files, the progress
reports, and the early failures (missing LoRA folder, missing prompt file)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import BaseConfig, ConfigError, EvaluateConfig
from components.evaluate.judges import Judges
from components.models.base_model import fingerprint_base
from components.stages.evaluate import EvaluateOutput, copy_for_evaluation, run_evaluate
from tests.tiny_pipeline import (
    random_lora_folder,
    single_thread,
    tiny_clip_folder,
    tiny_sd_pipeline,
    torchscript_extractor,
)

_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage")
    pipe = tiny_sd_pipeline(tmp)
    lora = random_lora_folder(pipe, tmp / "lora")
    pipe.save_pretrained(tmp / "base", safe_serialization=True)
    tiny_clip_folder(tmp / "clip")
    refs = tmp / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(refs / f"{i}.png")
    (tmp / "prompts.txt").write_text("a red car\na blue house\n")
    cfg = EvaluateConfig(steps=[1, 2], teacher_steps=[], teacher_samplers=["ddim"], samples_per_prompt=2,
                         batch_size=4, agreement_reference="ddim-2", prompts=str(tmp / "prompts.txt"),
                         feature_extractor=str(torchscript_extractor(tmp / "features.pt")),
                         clip_model=str(tmp / "clip"), reference_images=str(refs),
                         lcm4_fd_max_ratio_to_teacher50=None, lcm4_fd_below_dpm4=False, adherence_min_ratio=None,
                         lcm1_psnr_min=1000.0)
    base = BaseConfig(reference=str(tmp / "base"), family="sd15", resolution=32, guidance_scale=2.0)
    return tmp, cfg, base, lora


def test_runner_with_the_base_s_real_judges(setup, monkeypatch):
    tmp, cfg, base, lora = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reports = []
    out = run_evaluate(cfg, base=fingerprint_base("tiny", base), lora_folder=lora, output=tmp / "out", progress=reports.append)
    assert isinstance(out, EvaluateOutput)
    labels = [row["label"] for row in out.doc["methods"]]
    assert labels == ["lcm-1", "lcm-2", "ddim-1", "ddim-2"]
    assert out.doc["info"]["feature_backbone"] == "TorchScript features.pt"
    assert out.doc["info"]["adherence"] == "CLIP score" and out.doc["info"]["reference_images"] == 6
    assert isinstance(out.doc["base_fingerprint"], str) and out.doc["base_fingerprint"]
    # The gate: the impossible PSNR minimum fails, and the record says so.
    assert out.passed is False and out.passed == out.doc["gate"]["passed"]
    assert out.violations == tuple(out.doc["gate"]["violations"]) and len(out.violations) == 1
    assert out.violations[0].startswith("evaluate.lcm1_psnr_min")
    # Files: the output folder and the LoRA folder.
    assert json.loads(out.paths["metrics.json"].read_text())["methods"] == out.doc["methods"]
    assert out.paths["metrics.json"].parent == tmp / "out" and out.paths["report.html"].is_file()
    assert json.loads((lora / "metrics.json").read_text())["gate"] == out.doc["gate"]
    # No machine path in what publish ships (issue 30, item 7): the LoRA is named by file and hash.
    from components.registry.hub_push import absolute_paths
    from components.storage.content_hash import file_sha256

    assert out.doc["lora"] == {"file": "pytorch_lora_weights.safetensors",
                               "sha256": file_sha256(lora / "pytorch_lora_weights.safetensors")}
    for folder in (tmp / "out", lora):
        for written in folder.rglob("*.json"):
            assert absolute_paths(json.loads(written.read_text())) == [], written
    # Progress: one report per sampled method, in order, with its seconds per image.
    assert [(r.stage, r.step, r.total, r.note) for r in reports] == [
        ("evaluate", i + 1, 4, label) for i, label in enumerate(labels)]
    assert all(r.metrics["s_per_image"] > 0 for r in reports)
    assert reports[-1].fraction == 1.0


def test_given_judges_replace_the_provider_and_their_prompts_are_the_default(setup):
    tmp, cfg, base, lora = setup
    (tmp / "judge_prompts.txt").write_text("a handwritten digit one\n")

    def grey(images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images.mean(dim=1, keepdim=True), 2).flatten(1)

    judges = Judges(grey, "grey 2x2", lambda images, prompts: 0.5, "constant", torch.rand(8, 3, 32, 32) * 2 - 1,
                    default_prompts=str(tmp / "judge_prompts.txt"))
    plain = cfg.model_copy(update={"prompts": None, "feature_extractor": None, "clip_model": None,
                                   "steps": [1], "agreement_reference": "ddim-1"})
    out = run_evaluate(plain, base=fingerprint_base("tiny", base.model_copy(update={"judges": "no-such-provider"})),
                       lora_folder=lora, output=tmp / "given", judges=judges)
    assert out.doc["info"]["feature_backbone"] == "grey 2x2" and out.doc["info"]["prompts"] == 1
    assert [row["adherence"] for row in out.doc["methods"]] == [0.5, 0.5]


def test_missing_inputs_fail_before_sampling(setup, tmp_path):
    _, cfg, base, lora = setup
    with pytest.raises(FileNotFoundError, match="--lora .*no such folder"):
        run_evaluate(cfg, base=fingerprint_base("tiny", base), lora_folder=tmp_path / "nope", output=tmp_path / "o")
    judges = Judges(lambda x: x.flatten(1), "flat", lambda i, p: 0.0, "zero", torch.zeros(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="evaluate.prompts is not set"):
        run_evaluate(cfg.model_copy(update={"prompts": None}), base=fingerprint_base("tiny", base), lora_folder=lora,
                     output=tmp_path / "o", judges=judges)
    assert not (tmp_path / "o").exists()


def test_copy_for_evaluation_leaves_the_distill_folder_alone(tmp_path):
    """The evaluation judges EVALUATION/lora, a copy without checkpoints and markers; the source is untouched."""
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "distill"
    (lora / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    save_file({"unet.w.lora_A.weight": torch.zeros(1, 1)}, str(lora / "pytorch_lora_weights.safetensors"))
    (lora / "_COMPLETE").write_text("pytorch_lora_weights.safetensors\n")
    judged = copy_for_evaluation(lora, tmp_path / "evaluation")
    assert judged == tmp_path / "evaluation" / "lora"
    assert sorted(p.name for p in judged.iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert (lora / "checkpoints").is_dir() and (lora / "_COMPLETE").is_file()
