"""`lcmlora toy style --hard` and `lcmlora toy style-lora --hard` on a tiny hard base and budget."""

from __future__ import annotations

import json

import pytest

from tests.test_toy_hard_cli import _cli, said, tiny
from tests.tiny_pipeline import single_thread

one_thread = pytest.fixture(single_thread)


def test_style_then_style_lora_hard_write_a_loadable_lora(tmp_path, one_thread):
    from components.lora import io as lora_io
    from components.models.base_model import load_base

    base = tmp_path / "base"
    built = _cli(["toy", "base", "--hard", *tiny(tmp_path), "--set", f"toy.hard.base_dir={base}"])
    assert built.exit_code == 0, said(built)
    settings = [f"toy.hard.base_dir={base}", f"toy.hard.style_dir={tmp_path / 'style'}", "toy.hard.style_count=8",
                "toy.hard.style_steps=3", "toy.hard.style_batch_size=4", "toy.hard.style_rank=4",
                "toy.hard.style_eval_images=4"]
    sets = [arg for s in settings for arg in ("--set", s)]
    styled = _cli(["toy", "style", "--hard", *sets])
    assert styled.exit_code == 0, said(styled)
    assert len(list((tmp_path / "style").glob("*.png"))) == 8
    out = tmp_path / "lora"
    trained = _cli(["toy", "style-lora", "--hard", *sets, "--output", str(out)])
    assert trained.exit_code == 0, said(trained)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"style_strength_with_lora_dpmpp25", "adherence_base_dpmpp25"} <= set(metrics)
    pipe = load_base(str(base), family="sd15").pipe
    lora_io.load_adapter(pipe, "sd15", lora_io.lora_file(out), "style")
    assert lora_io.adapter_factors(pipe, "style")  # the LoRA loads into the hard base

    # --rescore: the saved LoRA scored again on the base, no training; the same base and noise give the
    # scores measured at training time, the training figures are kept and the weights are not touched
    weights = (out / "pytorch_lora_weights.safetensors").read_bytes()
    stale = {**metrics, "style_strength_with_lora_dpmpp25": 123.0, "adherence_base_dpmpp25": -1.0}
    (out / "metrics.json").write_text(json.dumps(stale))
    rescored = _cli(["toy", "style-lora", "--hard", "--rescore", *sets, "--output", str(out)])
    assert rescored.exit_code == 0, said(rescored)
    after = json.loads((out / "metrics.json").read_text())
    for key in ("style_strength_with_lora_dpmpp25", "style_strength_base_dpmpp25", "adherence_with_lora_dpmpp25",
                "adherence_base_dpmpp25"):
        assert after[key] == pytest.approx(metrics[key], abs=1e-4), key
    assert after["train_seconds"] == metrics["train_seconds"] and after["scored_base_fingerprint"]
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == weights
    assert _cli(["toy", "style-lora", "--rescore"]).exit_code != 0  # without --hard: refused


def test_style_lora_sdxl_needs_the_hard_toy():
    result = _cli(["toy", "style-lora", "--sdxl"])
    assert result.exit_code != 0 and "add --hard" in said(result)


def test_reproduce_merge_needs_a_hard_family():
    result = _cli(["reproduce", "--toy", "--merge", "--dry-run"])
    assert result.exit_code != 0 and "--merge checks the merge claim" in said(result)
    for family in ("sd15", "sdxl", "both"):
        assert _cli(["reproduce", "--toy", "--hard", "--family", family, "--merge", "--dry-run"]).exit_code == 0
