"""The LoRA artifact folder of a distillation run (components/distill/artifact.py, DESIGN contract 4)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from safetensors import safe_open

from components.config import DistillConfig
from components.distill.artifact import (
    RECOMMENDED_GUIDANCE,
    RECOMMENDED_STEPS,
    distill_metrics,
    write_distill_artifact,
)
from components.lora.adapter import add_lora, lora_config, unet_lora_state_dict
from components.lora.formats import (
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    lora_delta,
    read_lora_file,
    read_metadata,
)
from components.lora.model_card import check_model_card
from tests.tiny_models import tiny_unet_config

BASE_META = {"name": "tiny", "reference": "data/toy/base", "family": "sd15", "resolution": 32,
             "prediction_type": "epsilon", "fingerprint": "f" * 64}
HISTORY = [(i + 1, 1.0 / (i + 1)) for i in range(30)]


@pytest.fixture(scope="module")
def lora_sd() -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = add_lora(UNet2DConditionModel(**tiny_unet_config("sd15")), lora_config(4, 8, DistillConfig().target_modules))
    g = torch.Generator().manual_seed(1)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g)
    return unet_lora_state_dict(unet)


def write(folder, lora_sd, **overrides):
    metrics = distill_metrics(HISTORY, steps=30, seconds=12.345, samples_per_second=9.87654, lora_params=1234)
    kwargs = {"lora_state_dict": lora_sd, "rank": 4, "alpha": 8, "base_meta": BASE_META, "metrics": metrics,
              "lineage": {"stage": "distill", "params_digest": "abc"}, "config_yaml": "distill:\n  lora_rank: 4\n",
              "loss_rows": [{"step": s, "loss": v, "loss_mean20": v} for s, v in HISTORY]}
    return write_distill_artifact(folder, **{**kwargs, **overrides}), metrics


def test_distill_metrics_final_and_smoothed_losses():
    m = distill_metrics(HISTORY, steps=30, seconds=12.345, samples_per_second=9.87654, lora_params=1234)
    assert m["steps"] == 30 and m["lora_trainable_params"] == 1234
    assert m["final_loss"] == 1.0 / 30
    assert m["final_loss_mean20"] == pytest.approx(sum(1.0 / s for s in range(11, 31)) / 20)
    assert m["first_loss_mean20"] == pytest.approx(sum(1.0 / s for s in range(1, 21)) / 20)
    assert m["seconds"] == 12.35 and m["samples_per_second"] == 9.877
    empty = distill_metrics([], steps=0, seconds=0.0, samples_per_second=0.0, lora_params=0)
    assert empty["final_loss"] is None and math.isnan(empty["final_loss_mean20"])


def test_folder_holds_every_contract_4_file(tmp_path, lora_sd):
    paths, metrics = write(tmp_path / "art", lora_sd)
    folder = tmp_path / "art"
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME, "README.md", "metrics.json", "lineage.json", "config.yaml",
        "loss_curve.csv", "loss_curve.png"])
    assert {k: v.name for k, v in paths.items()} == {
        "diffusers": LORA_WEIGHT_NAME, "kohya": KOHYA_WEIGHT_NAME, "model_card": "README.md",
        "metrics": "metrics.json", "lineage": "lineage.json", "config": "config.yaml",
        "loss_csv": "loss_curve.csv", "loss_png": "loss_curve.png"}
    assert json.loads((folder / "metrics.json").read_text()) == {"distill": metrics}
    assert json.loads((folder / "lineage.json").read_text()) == {"stage": "distill", "params_digest": "abc"}
    assert (folder / "config.yaml").read_text() == "distill:\n  lora_rank: 4\n"
    with (folder / "loss_curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and rows[0] == {"step": "1", "loss": "1.0", "loss_mean20": "1.0"}
    assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_card_front_matter(tmp_path, lora_sd):
    write(tmp_path, lora_sd)
    front = check_model_card((tmp_path / "README.md").read_text())
    assert "base_model" not in front, "a local base is not a hub id: left out of the card"
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-image"
    assert "lcm-lora" in front["tags"]
    assert front["recommended"] == {"num_inference_steps": RECOMMENDED_STEPS, "guidance_scale": RECOMMENDED_GUIDANCE,
                                    "scheduler": "LCMScheduler"}
    assert front["lcm_lora"] == {"rank": 4, "alpha": 8, "family": "sd15", "base_fingerprint": "f" * 64}
    text = (tmp_path / "README.md").read_text()
    assert "# tiny-lcm-lora" in text and "rank 4, alpha 8" in text and "30 steps" in text


def test_both_lora_files_carry_the_same_update_with_per_module_alpha(tmp_path, lora_sd):
    write(tmp_path, lora_sd)
    modules = sorted({k.removesuffix(".lora_A.weight") for k in lora_sd if k.endswith(".lora_A.weight")})
    with safe_open(str(tmp_path / KOHYA_WEIGHT_NAME), "pt") as f:
        alpha_keys = [k for k in f.keys() if k.endswith(".alpha")]  # noqa: SIM118 - safe_open has no __iter__
        assert len(alpha_keys) == len(modules)  # one alpha per adapted module
        assert all(f.get_tensor(k).item() == 8.0 for k in alpha_keys)
    kohya_meta = read_metadata(tmp_path / KOHYA_WEIGHT_NAME)
    assert kohya_meta["ss_network_dim"] == "4" and kohya_meta["ss_network_alpha"] == "8"
    assert kohya_meta["ss_steps"] == "30" and kohya_meta["ss_output_name"] == "tiny-lcm-lora"

    peft_sd, peft_alphas = read_lora_file(tmp_path / LORA_WEIGHT_NAME)
    kohya_sd, kohya_alphas = read_lora_file(tmp_path / KOHYA_WEIGHT_NAME)
    assert set(peft_alphas.values()) == set(kohya_alphas.values()) == {8.0}
    assert {k.removeprefix("unet.") for k in peft_sd} == set(lora_sd)
    for module in (f"unet.{m}" for m in modules):
        delta = lora_delta(peft_sd, peft_alphas, module)
        assert torch.allclose(delta, lora_delta(kohya_sd, kohya_alphas, module), atol=1e-6)
        a, b = lora_sd[f"{module[5:]}.lora_A.weight"], lora_sd[f"{module[5:]}.lora_B.weight"]
        if a.ndim == 2:
            assert torch.allclose(delta, 2.0 * (b @ a), atol=1e-5)  # (alpha / r) B A


def test_rerun_drops_the_previous_runs_gate_and_keeps_its_checkpoints(tmp_path, lora_sd):
    # A gate (or evaluation) in the folder judged the previous run's weights: it must not
    # describe the new ones (issue 16 item 12). Checkpoints of the run stay for the caller.
    (tmp_path / "metrics.json").write_text(json.dumps({"gate": {"passed": True}}))
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    _, metrics = write(tmp_path, lora_sd)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"distill": metrics}
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()


def test_config_and_lineage_hold_no_absolute_local_path(tmp_path, lora_sd):
    import json

    from components.paths import PROJECT_ROOT

    config = f"storage:\n  root: {tmp_path / 'artifacts'}\nbases:\n  toy:\n    reference: {PROJECT_ROOT}/data/toy/base\n"
    lineage = {"stage": "distill", "inputs": {"base": {"reference": f"{PROJECT_ROOT}/data/toy/base"},
                                              "latents": {"index": str(tmp_path / "latents/index.json")}}}
    write(tmp_path / "art", lora_sd, config_yaml=config, lineage=lineage)
    config_text = (tmp_path / "art/config.yaml").read_text()
    written = json.loads((tmp_path / "art/lineage.json").read_text())
    assert "reference: data/toy/base" in config_text and str(PROJECT_ROOT) not in config_text
    assert written["inputs"]["base"]["reference"] == "data/toy/base"
    assert written["inputs"]["latents"]["index"] == "local:index.json"  # outside the repository: its name
    for text in (config_text, (tmp_path / "art/lineage.json").read_text()):
        assert str(tmp_path) not in text and "file://" not in text, text


def test_a_pcm_artifact_names_its_objective_and_recommends_tcd_at_its_phase_edges(tmp_path, lora_sd):
    from components.lora.formats import read_metadata
    from components.lora.model_card import parse_model_card
    from components.lora.objective import METADATA_KEY, recipe, recipe_of_lora

    lcm_paths, _ = write(tmp_path / "lcm", lora_sd)
    pcm_paths, _ = write(tmp_path / "pcm", lora_sd, recipe=recipe("pcm", 2, [999, 499]))
    # an LCM-LoRA's files carry no objective key (they are what they were); a PCM-LoRA's both do
    assert METADATA_KEY not in read_metadata(lcm_paths["diffusers"])
    assert METADATA_KEY not in read_metadata(lcm_paths["kohya"])
    assert recipe_of_lora(tmp_path / "lcm") == recipe("lcm")
    assert recipe_of_lora(tmp_path / "pcm") == recipe("pcm", 2, [999, 499])
    assert recipe_of_lora(pcm_paths["kohya"]).timesteps == (999, 499)
    assert "PCM-LoRA" in read_metadata(pcm_paths["kohya"])["ss_training_comment"]
    front, body = parse_model_card(pcm_paths["model_card"].read_text())
    assert front["recommended"] == {"num_inference_steps": 2, "guidance_scale": 1.0, "scheduler": "TCDScheduler",
                                    "eta": 0.0, "timesteps": [999, 499]}
    assert "pcm-lora" in front["tags"] and "lcm-lora" not in front["tags"]
    assert "TCDScheduler.from_config" in body and "eta=0.0, timesteps=[999, 499]" in body and "2 phases" in body
    compile(body.split("```python\n")[1].split("```")[0], "card", "exec")  # the snippet runs as written
    assert "LCMScheduler" in parse_model_card(lcm_paths["model_card"].read_text())[1]


def test_an_unreadable_objective_record_is_named():
    from components.lora.objective import METADATA_KEY, recipe_from_metadata

    with pytest.raises(ValueError, match="lcmlora.objective"):
        recipe_from_metadata({METADATA_KEY: '{"objective": "xcm"}'})
    with pytest.raises(ValueError, match="phases"):
        recipe_from_metadata({METADATA_KEY: '{"objective": "pcm"}'})
