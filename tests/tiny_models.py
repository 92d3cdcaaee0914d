"""Tiny random-init SD-1.5- and SDXL-family pipelines for tests (built from config, no downloads).

The tokenizer is a character-level CLIP tokenizer written to a temporary folder, so
captions really go through tokenizer and text encoder(s).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def tiny_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=16)


def tiny_text_encoder(hidden: int, projection: bool, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=hidden, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_unet_config(family: str) -> dict:
    base = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (16, 32),
                "norm_num_groups": 8, "attention_head_dim": 4}
    if family == "sd15":
        return dict(base, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16)
    return dict(base, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4)


def tiny_pipeline(family: str, folder: Path, seed: int = 0):
    """A tiny pipeline of the family with random weights; latents 4x8x8 for 32x32 images."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    tok = tiny_tokenizer(folder / "tokenizer")
    unet = UNet2DConditionModel(**tiny_unet_config(family))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=4, layers_per_block=1, sample_size=32)
    sched = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
                 "steps_offset": 1}
    if family == "sd15":
        return StableDiffusionPipeline(vae=vae, text_encoder=tiny_text_encoder(16, False, len(tok)), tokenizer=tok,
                                       unet=unet, scheduler=PNDMScheduler(**sched, skip_prk_steps=True),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=tiny_text_encoder(16, False, len(tok)),
                                     text_encoder_2=tiny_text_encoder(16, True, len(tok)), tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(**{k: v for k, v in sched.items() if k != "set_alpha_to_one"}))


def unet_inputs(unet, batch: int = 2, seed: int = 0) -> dict:
    """Deterministic UNet inputs (sample, timestep, text states, SDXL added conditions)."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    states = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    kwargs = {"sample": x, "timestep": torch.tensor([500] * batch), "encoder_hidden_states": states}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                       "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * batch, dtype=torch.float32)}
    return kwargs
