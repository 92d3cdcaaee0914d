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
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from components.toy.base import assemble_pipeline, toy_text_encoder, toy_unet, toy_vae
from components.toy.tokenizer import build_toy_tokenizer

SDXL_TEXT_WIDTHS = (32, 32)  # hidden sizes of text_encoder and text_encoder_2
SDXL_POOLED_DIM = 32  # projection_dim of text_encoder_2 (pooled "text_embeds")
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim; six size/crop numbers are embedded


def _tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        return build_toy_tokenizer(tmp)


def _text_config(tokenizer: CLIPTokenizer, width: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                          projection_dim=projection_dim, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL-style UNet (text_time added conditioning, linear projections) at 8x8 latents."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 1), cross_attention_dim=sum(SDXL_TEXT_WIDTHS), norm_num_groups=16,
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_EMBED_DIM)


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


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random-init SDXL-family pipeline: 32x32 images, 4x8x8 latents, two tiny CLIP text encoders."""
    tokenizer, tokenizer_2 = _tokenizer(), _tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, SDXL_TEXT_WIDTHS[0], SDXL_POOLED_DIM))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, SDXL_TEXT_WIDTHS[1], SDXL_POOLED_DIM))
    vae = toy_vae(seed + 2)
    vae.register_to_config(force_upcast=False)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=tiny_sdxl_unet(seed + 3),
                                     scheduler=sdxl_scheduler(), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random-init SD-1.5-family pipeline with the toy base's architecture (32x32 images, 4x8x8 latents)."""
    tokenizer = _tokenizer()
    pipe = assemble_pipeline(toy_vae(seed), toy_unet(seed + 1), toy_text_encoder(tokenizer, seed + 2), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
