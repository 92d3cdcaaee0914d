"""The SDXL-family hard toy base: two text encoders, pooled embeddings, micro-conditioning.

Architecture: the hard VAE (3x64x64 <-> 4x16x16, shared with the SD-1.5 family), a
`CLIPTextModel` (width 32) and a `CLIPTextModelWithProjection` (width 32, pooled 32) whose
penultimate hidden states are concatenated (cross_attention_dim 64), and a UNet with
`addition_embed_type="text_time"` that also sees the pooled text and the six numbers
(original_size, crop_top_left, target_size), as SDXL. Shipped as a
`StableDiffusionXLPipeline` with SDXL's Euler scheduler.

Training samples come from the hard source's *varied original sizes*
(`components/toy/hard/source.py:original_canvas`): each image is resized so its shorter side
is 64 and randomly cropped to 64x64; the crop's top-left and the original size are the
micro-conditioning, so `crop_top_left=(0, 0)` at inference asks for the uncut scene.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from components.toy.hard.base import MAX_TOKENS, hard_tokenizer
from components.toy.hard.render import HARD_SIZE
from components.toy.sdxl import sdxl_scheduler

TEXT_WIDTHS = (32, 32)  # hidden sizes of text_encoder and text_encoder_2
POOLED_DIM = 32  # projection_dim of text_encoder_2 ("text_embeds")
TIME_EMBED_DIM = 8  # addition_time_embed_dim; six size/crop numbers are embedded


def _text_config(tokenizer: CLIPTokenizer, width: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                          projection_dim=POOLED_DIM, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def hard_sdxl_text_encoders(tokenizer: CLIPTokenizer, seed: int = 0
                            ) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """The two CLIP text encoders (width 32 each; the second with a 32-d pooled projection)."""
    torch.manual_seed(seed)
    first = CLIPTextModel(_text_config(tokenizer, TEXT_WIDTHS[0]))
    torch.manual_seed(seed + 1)
    return first, CLIPTextModelWithProjection(_text_config(tokenizer, TEXT_WIDTHS[1]))


def hard_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL-style UNet at 16x16 and 8x8 latents: text_time added conditioning, linear projections."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=HARD_SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 1), cross_attention_dim=sum(TEXT_WIDTHS), norm_num_groups=16,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_EMBED_DIM)


def assemble_hard_sdxl(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                       text_encoder_2: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer
                       ) -> StableDiffusionXLPipeline:
    """The components as a StableDiffusionXLPipeline (one tokenizer serves both encoders)."""
    vae.register_to_config(force_upcast=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=sdxl_scheduler(), force_zeros_for_empty_prompt=True)


def encode_sdxl_prompt(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
                       ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B x 16 ids -> (B x 16 x 64 penultimate states of both encoders, B x 32 pooled), as SDXL encodes."""
    first = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out2 = text_encoder_2(ids, output_hidden_states=True)
    return torch.cat([first, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
             target_size: tuple[int, int] = (HARD_SIZE, HARD_SIZE)) -> torch.Tensor:
    """SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): (h_orig, w_orig, top, left, h, w) as a 6-vector."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def random_crop(image: Image.Image, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """Resize the shorter side to 64, crop 64x64 at random: (3x64x64 array in [-1, 1], its time ids)."""
    w, h = image.size
    scale = HARD_SIZE / min(w, h)
    rw, rh = max(HARD_SIZE, round(w * scale)), max(HARD_SIZE, round(h * scale))
    resized = image.convert("RGB").resize((rw, rh), Image.Resampling.BICUBIC)
    top, left = int(rng.integers(0, rh - HARD_SIZE + 1)), int(rng.integers(0, rw - HARD_SIZE + 1))
    crop = resized.crop((left, top, left + HARD_SIZE, top + HARD_SIZE))
    array = (np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
    return array, time_ids((h, w), (top, left))


def sdxl_epsilon_loss(unet: UNet2DConditionModel, scheduler: DDPMScheduler, latents: torch.Tensor,
                      prompt_embeds: torch.Tensor, pooled: torch.Tensor, add_time_ids: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """DDPM simple loss (Ho et al. 2020, eq. 14) with SDXL's added conditions (pooled text B x 32, time ids B x 6)."""
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids}).sample
    return torch.nn.functional.mse_loss(pred, noise)


def build_untrained_hard_sdxl(vae: AutoencoderKL, folder: str | Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """The SDXL-family architecture around a trained hard VAE, untrained (training: not yet written)."""
    tokenizer = hard_tokenizer(Path(folder) / "tokenizer")
    text_encoder, text_encoder_2 = hard_sdxl_text_encoders(tokenizer, seed)
    return assemble_hard_sdxl(vae, hard_sdxl_unet(seed + 2), text_encoder, text_encoder_2, tokenizer)
