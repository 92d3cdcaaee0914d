"""Tiny random-init pipelines of both families for the merge and single-file tests (no tokenizers:
the tests feed token ids directly). Self-contained so that these tests depend only on diffusers."""

from __future__ import annotations

import torch


def _text_encoder(width: int, seed: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=64, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=8, projection_dim=16,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16)


def tiny_sd15(seed: int = 0, widths: tuple[int, int] = (16, 32)):
    """SD-1.5 family: 2 UNet levels (cross-attention down, plain down), conv projections, 16-wide CLIP."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    return StableDiffusionPipeline(vae=_vae(seed + 1), text_encoder=_text_encoder(16, seed + 2), tokenizer=None,
                                   unet=unet, scheduler=LCMScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def tiny_sdxl(seed: int = 0, widths: tuple[int, int] = (16, 24)):
    """SDXL family: two CLIP encoders (the second with a projection; different widths, as in SDXL, so
    single-file loaders can tell them apart), text_time conditioning, linear projections."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=sum(widths), norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4)
    return StableDiffusionXLPipeline(vae=_vae(seed + 1), text_encoder=_text_encoder(widths[0], seed + 2),
                                     text_encoder_2=_text_encoder(widths[1], seed + 3, projection=True),
                                     tokenizer=None, tokenizer_2=None, unet=unet,
                                     scheduler=EulerDiscreteScheduler(steps_offset=1))
