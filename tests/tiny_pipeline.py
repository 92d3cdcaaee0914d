"""Tiny random-init SD-1.5-family pipelines and LoRA folders for evaluation tests (seconds on CPU).

32x32 RGB images, VAE factor 4 (4x8x8 latents), a 2-layer CLIP text encoder with a byte-level
tokenizer written on the fly: the toy base's shape without its training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _write_byte_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt of a CLIP BPE tokenizer with byte symbols only (no merges)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def tiny_sd_pipeline(tmp: Path, seed: int = 0):
    """A random-init StableDiffusionPipeline: 32x32 images, 4x8x8 latents, CPU float32."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=512, eos_token_id=513, pad_token_id=513))
    _write_byte_tokenizer(tmp / "tokenizer")
    tokenizer = CLIPTokenizer(str(tmp / "tokenizer" / "vocab.json"), str(tmp / "tokenizer" / "merges.txt"),
                              model_max_length=32, pad_token="<|endoftext|>")
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              num_train_timesteps=1000, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora_folder(pipe, folder: Path, rank: int = 4, alpha: int = 4, seed: int = 1, scale: float = 0.3) -> Path:
    """Save a LoRA with random (non-zero) up and down weights on the UNet's attention projections."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(config, adapter_name="rand")
    state = {k: v * scale for k, v in get_peft_model_state_dict(pipe.unet, adapter_name="rand").items()}
    pipe.unet.delete_adapters("rand")
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    return folder
