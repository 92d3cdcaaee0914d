"""Tiny random-init pipelines of both families: structure, determinism, 2-step generation on CPU."""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from components.toy.sdxl import build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline

GENERATION_BUDGET_S = 2.0  # the brief: a 2-step generation runs in under 2 s on CPU (x3 slack on a shared CPU)


def _first_weights(pipe) -> torch.Tensor:
    return next(pipe.unet.parameters()).detach().clone()


def test_sdxl_builder_has_the_sdxl_family_structure():
    pipe = build_tiny_sdxl_pipeline(seed=0)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == widths
    expected = pipe.text_encoder_2.config.projection_dim + 6 * pipe.unet.config.addition_time_embed_dim
    assert pipe.unet.config.projection_class_embeddings_input_dim == expected


def test_sd15_builder_matches_the_toy_base_shapes():
    pipe = build_tiny_sd15_pipeline(seed=0)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize("builder", [build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline])
def test_builders_are_deterministic_for_a_seed(builder):
    assert torch.equal(_first_weights(builder(seed=3)), _first_weights(builder(seed=3)))
    assert not torch.equal(_first_weights(builder(seed=3)), _first_weights(builder(seed=4)))


@pytest.mark.parametrize("builder", [build_tiny_sd15_pipeline, build_tiny_sdxl_pipeline])
def test_two_step_generation_is_fast_on_cpu(builder):
    pipe = builder(seed=0)
    generator = torch.Generator().manual_seed(0)
    pipe("a handwritten digit one", num_inference_steps=2, output_type="pt", generator=generator)  # warm-up
    timings = []
    for _ in range(3):  # the fastest of three: robust to other jobs on a shared CPU
        start = time.perf_counter()
        images = pipe(["a handwritten digit seven"] * 2, num_inference_steps=2, guidance_scale=2.0,
                      output_type="pt", generator=generator).images
        timings.append(time.perf_counter() - start)
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert min(timings) < 3 * GENERATION_BUDGET_S, f"2-step generation took {min(timings):.2f}s at best"
