"""The committed toy base: loads offline in diffusers layout, stays small, and draws the prompted digit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from components.config import load_params
from components.toy.base import encode_prompts
from components.toy.classifier import load_digit_classifier
from components.toy.render import caption_for

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "data" / "toy" / "base"
SAMPLES = 100  # DDIM-50 CFG samples checked here, 10 per digit (docs/toy.md reports 500)


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    os.environ["HF_HUB_OFFLINE"] = "1"
    pipe = StableDiffusionPipeline.from_pretrained(str(BASE), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def toy_guidance() -> float:
    return load_params(ROOT / "params.yaml").base("toy").guidance_scale


def test_base_is_small_safetensors_only_diffusers_layout():
    files = [p for p in BASE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    assert not [p for p in files if p.suffix in {".bin", ".ckpt", ".pt", ".pth"}]
    index = json.loads((BASE / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)


def test_architecture_and_schedule_are_sd15_family(pipe):
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert 0.5e6 < sum(p.numel() for p in pipe.unet.parameters()) < 2e6
    sched = pipe.scheduler.config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert sched.prediction_type == "epsilon" and sched.num_train_timesteps == 1000


def test_captions_tokenize_to_whole_words(pipe):
    ids = pipe.tokenizer(caption_for(7)).input_ids
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "seven</w>", "<|endoftext|>"]


def test_toy_guidance_is_at_most_3(toy_guidance):
    assert toy_guidance <= 3.0


def test_ddim50_with_cfg_draws_the_prompted_digit(pipe, toy_guidance):
    """The issue's acceptance check: the classifier recognises the prompted digit in >= 80% of samples."""
    classifier = load_digit_classifier()
    labels = torch.arange(SAMPLES) % 10
    generator = torch.Generator().manual_seed(1234)
    images = pipe([caption_for(int(d)) for d in labels], num_inference_steps=50, guidance_scale=toy_guidance,
                  generator=generator, output_type="pt").images
    accuracy = (classifier.predict(images * 2 - 1) == labels).float().mean().item()
    assert accuracy >= 0.8, f"prompted-digit accuracy {accuracy:.3f} at guidance {toy_guidance}"


def test_prompt_embeddings_match_the_pipeline(pipe):
    ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, [caption_for(3)])
    theirs, _ = pipe.encode_prompt(caption_for(3), "cpu", 1, False)
    torch.testing.assert_close(ours, theirs)
