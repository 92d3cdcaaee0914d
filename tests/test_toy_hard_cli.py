"""`lcmlora toy base --hard [--sdxl]` on a tiny budget: the hard builders with params' `toy.hard`
settings write pipelines that load and generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny_pipeline import single_thread

one_thread = pytest.fixture(single_thread)  # a shared 2-core machine: more threads only spin


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, args)


def said(result) -> str:
    """What a failed command says: its output, or the error it raised."""
    return f"{result.output}{result.exception or ''}"


def tiny(tmp: Path) -> list[str]:
    """A few steps of everything, every file under `tmp` (never the shared checkpoint folder)."""
    settings = ["train_scenes=16", "vae_steps=2", "vae_batch_size=4", "train_steps=2", "batch_size=4",
                "warmup_steps=1", "eval_every=1", "text_pretrain_steps=2", "decoder_steps=2",
                f"checkpoint_dir={tmp / 'ckpt'}"]
    return [arg for s in settings for arg in ("--set", f"toy.hard.{s}")]


def test_toy_base_hard_then_sdxl_write_loadable_pipelines(tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    result = _cli(["toy", "base", "--hard", "--output", str(tmp_path / "base"), *tiny(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["unet_steps"] == 2 and report["params"]["checkpoint_dir"] == str(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "last.pt").is_file()
    assert report["vae_trained_s"] > 0 and report["unet_trained_s"] > 0  # summed over resumed runs
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "base"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    caption = "a red seven on the left and a blue two on the right"
    out = pipe([caption], num_inference_steps=2, guidance_scale=5.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64)

    # the decoder fine-tune of a saved base, in place: its encoder (the UNet's latent space) unchanged
    from safetensors.torch import load_file

    from components.toy.hard.__main__ import main as hard_main

    vae_file = tmp_path / "base" / "vae" / "diffusion_pytorch_model.safetensors"
    old = load_file(vae_file)
    assert hard_main(["decoder", "--set", f"base_dir={tmp_path / 'base'}", "--set", "train_scenes=16",
                      "--set", "decoder_steps=2", "--set", "vae_batch_size=4"]) == 0
    new = load_file(vae_file)
    assert all(torch.equal(new[k], v) for k, v in old.items() if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(new[k], v) for k, v in old.items() if k.startswith("decoder."))
    decoder_report = json.loads((tmp_path / "base" / "decoder.json").read_text())
    assert set(decoder_report["after"]["style_strength"]) >= {"styled", "styled_through_vae"}
    assert "_name_or_path" not in json.loads((tmp_path / "base" / "vae" / "config.json").read_text())

    result = _cli(["toy", "base", "--hard", "--sdxl", "--output", str(tmp_path / "xl"), *tiny(tmp_path),
                   "--set", f"toy.hard.base_dir={tmp_path / 'base'}"])
    assert result.exit_code == 0, result.output
    xl = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "xl"))
    xl.set_progress_bar_config(disable=True)
    out = xl([caption], num_inference_steps=2, guidance_scale=5.0, output_type="pt",
             generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64)


def test_toy_base_hard_flags_and_settings_are_checked(tmp_path):
    dry = _cli(["toy", "base", "--hard", "--dry-run", "--output", str(tmp_path / "b"), "--set", "toy.hard.seed=4"])
    assert dry.exit_code == 0 and f"base_dir: {tmp_path / 'b'}" in dry.output and "seed: 4" in dry.output
    typo = _cli(["toy", "base", "--hard", "--dry-run", "--set", "toy.hard.trian_steps=2"])
    assert typo.exit_code != 0 and "toy.hard.trian_steps: unknown key" in said(typo)
    alone = _cli(["toy", "base", "--sdxl", "--dry-run"])
    assert alone.exit_code != 0 and "--hard --sdxl" in said(alone)
    cuda = _cli(["toy", "base", "--hard", "--set", "toy.hard.device=cuda", *tiny(tmp_path)])
    assert cuda.exit_code != 0 and "toy.hard.device=cuda" in said(cuda)
    assert "no CUDA device" in said(cuda) and not (tmp_path / "ckpt").exists()  # refused before training
