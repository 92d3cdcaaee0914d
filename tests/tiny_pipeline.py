"""Tiny random-init SD-1.5-family pipelines and LoRA folders for evaluation tests (seconds on CPU).

32x32 RGB images, VAE factor 4 (4x8x8 latents), a 2-layer CLIP text encoder with a byte-level
tokenizer written on the fly: the toy base's shape without its training.
"""

from __future__ import annotations

import copy
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


def single_thread():
    """Pytest fixture body: one torch thread. On a shared 2-core machine, intra-op threads spin against
    other processes and tiny UNet calls get 10-60x slower; one thread keeps these tests fast."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_sd_pipeline(tmp: Path, seed: int = 0):
    """A random-init StableDiffusionPipeline: 32x32 images, 4x8x8 latents, CPU float32."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
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
    unet = copy.deepcopy(pipe.unet)  # the pipeline's own UNet stays free of peft layers
    unet.add_adapter(config, adapter_name="rand")
    state = {k: v * scale for k, v in get_peft_model_state_dict(unet, adapter_name="rand").items()}
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    return folder


def tiny_clip_folder(folder: Path):
    """A random-init CLIPModel with processor files saved to `folder`; returns (model, processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    _write_byte_tokenizer(folder / "tok")
    tokenizer = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"),
                              model_max_length=32, pad_token="<|endoftext|>")
    config = CLIPConfig(
        text_config={"vocab_size": 514, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 512, "eos_token_id": 513,
                         "pad_token_id": 513},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "image_size": 32, "patch_size": 8},
        projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return model.eval(), processor


class MeanRGB(torch.nn.Module):
    """A TorchScript-able stand-in for the FID Inception: per-channel mean and std of its [0, 255] input."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if not return_features:
            raise RuntimeError("expected return_features=True")
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def torchscript_extractor(path: Path) -> Path:
    """Save MeanRGB as a TorchScript file (the format `evaluate.feature_extractor` takes)."""
    torch.jit.save(torch.jit.script(MeanRGB()), str(path))
    return path
