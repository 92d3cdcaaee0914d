"""Tiny random-init pipelines of both families for the merge and single-file tests.

Self-contained so that these tests depend only on diffusers and transformers. Tests that compare
module outputs feed token ids directly; `tiny_sd15(tokenizer_dir=...)` adds a byte-level CLIP
tokenizer for tests that sample from prompts."""

from __future__ import annotations

import torch

MAX_TOKENS = 32  # prompt length in tokens (one per character)
VOCAB = 514  # 256 byte symbols, the same at word ends (</w>), <|startoftext|>, <|endoftext|>


def byte_tokenizer(folder):
    """A CLIP BPE tokenizer with one token per byte and no merges, written to `folder`."""
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(
        [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"])}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS,
                         pad_token="<|endoftext|>")


def _text_encoder(width: int, seed: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=16,
                            bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16)


def tiny_sd15(seed: int = 0, widths: tuple[int, int] = (16, 32), tokenizer_dir=None):
    """SD-1.5 family: 2 UNet levels (cross-attention down, plain down), conv projections, 16-wide CLIP."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    tokenizer = byte_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    return StableDiffusionPipeline(vae=_vae(seed + 1), text_encoder=_text_encoder(16, seed + 2), tokenizer=tokenizer,
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
