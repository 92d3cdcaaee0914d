"""Tiny random-init pipelines of both families, built from config, for fast tests.

- `build_tiny_sdxl_pipeline`: SDXL family (two CLIP text encoders, the second with a
  projection; UNet with `addition_embed_type="text_time"` conditioning on pooled text and
  the six size/crop numbers), 32x32 images, 4x8x8 latents.
- `build_tiny_sd15_pipeline`: SD-1.5 family with exactly the toy base's architecture
  (`components/toy/base.py`), untrained.

Nothing is downloaded: tokenizers are built locally (`components/toy/tokenizer.py`).
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from components.toy.base import (
    assemble_pipeline,
    clip_text_config,
    conditioned_unet,
    toy_text_encoder,
    toy_unet,
    toy_vae,
)
from components.toy.tokenizer import build_toy_tokenizer

SDXL_TEXT_WIDTHS = (32, 32)  # hidden sizes of text_encoder and text_encoder_2
SDXL_POOLED_DIM = 32  # projection_dim of text_encoder_2 (pooled "text_embeds")
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim; six size/crop numbers are embedded


def _tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        return build_toy_tokenizer(tmp)


def sdxl_text_encoders(tokenizers: tuple[CLIPTokenizer, CLIPTokenizer], widths: tuple[int, int], pooled_dim: int,
                       positions: int, seed: int = 0) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's two CLIP text encoders (2 layers each, of `widths`; the second with a `pooled_dim` projection),
    seeded `seed` and `seed + 1`."""
    configs = [clip_text_config(tokenizer, width, positions, 2, pooled_dim, hidden_act="gelu")
               for tokenizer, width in zip(tokenizers, widths, strict=True)]
    torch.manual_seed(seed)
    first = CLIPTextModel(configs[0])
    torch.manual_seed(seed + 1)
    return first, CLIPTextModelWithProjection(configs[1])


def sdxl_unet(seed: int, sample_size: int, cross: tuple[bool, ...], widths: tuple[int, ...],
              heads: tuple[int, ...], text_width: int, pooled_dim: int, time_embed_dim: int) -> UNet2DConditionModel:
    """SDXL-style UNet (`conditioned_unet`'s levels): text_time added conditioning on the pooled text and the
    six size/crop numbers, linear projections, one transformer layer per level."""
    return conditioned_unet(seed, sample_size, cross, widths, text_width, attention_head_dim=heads,
                            use_linear_projection=True, transformer_layers_per_block=(1,) * len(cross),
                            addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
                            projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim)


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL-style UNet (text_time added conditioning, linear projections) at 8x8 latents."""
    return sdxl_unet(seed, 8, (False, True), (32, 64), (2, 4), sum(SDXL_TEXT_WIDTHS), SDXL_POOLED_DIM,
                     SDXL_TIME_EMBED_DIM)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL's default scheduler config (scaled_linear 0.00085..0.012, epsilon, trailing-free leading spacing).

    Like stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json it also carries the
    DDIM keys Euler ignores (`clip_sample` false, ...): `DDIMScheduler.from_config` on it must not
    fall back to DDIM's default `clip_sample=True`, which clips the predicted latents to [-1, 1].
    """
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading")
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0)
    return scheduler


def assemble_sdxl(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                  text_encoder_2: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer,
                  tokenizer_2: CLIPTokenizer) -> StableDiffusionXLPipeline:
    """The components as a StableDiffusionXLPipeline with SDXL's scheduler, the VAE kept in its dtype."""
    vae.register_to_config(force_upcast=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=sdxl_scheduler(), force_zeros_for_empty_prompt=True)


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random-init SDXL-family pipeline: 32x32 images, 4x8x8 latents, two tiny CLIP text encoders."""
    tokenizer, tokenizer_2 = _tokenizer(), _tokenizer()
    text_encoder, text_encoder_2 = sdxl_text_encoders((tokenizer, tokenizer_2), SDXL_TEXT_WIDTHS, SDXL_POOLED_DIM,
                                                      77, seed)
    vae = toy_vae(seed + 2)
    pipe = assemble_sdxl(vae, tiny_sdxl_unet(seed + 3), text_encoder, text_encoder_2, tokenizer, tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random-init SD-1.5-family pipeline with the toy base's architecture (32x32 images, 4x8x8 latents)."""
    tokenizer = _tokenizer()
    pipe = assemble_pipeline(toy_vae(seed), toy_unet(seed + 1), toy_text_encoder(tokenizer, seed + 2), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
