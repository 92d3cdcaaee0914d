"""components/serve/pipeline_loader.py: a registry version loaded into a diffusers pipeline for 4-step use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.registry.manifest import RegistryError
from components.registry.registry import Registry
from components.serve.pipeline_loader import load_lcm_pipeline
from components.storage.storage import Storage

CARD = ("---\nbase_model: data/toy/base\nlibrary_name: diffusers\ntags: [lora, lcm]\n"
        "recommended:\n  num_inference_steps: 4\n  guidance_scale: 1.0\n---\n\n# test lora\n")


def registry_at(root: str, tmp_path: Path) -> Registry:
    return Registry(Storage(root), cache_dir=tmp_path / "cache")


def _tiny_sd_pipeline(tmp: Path):
    """A random-init StableDiffusionPipeline (32x32 images, 4x8x8 latents) built from config."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, sample_size=32)
    words = ["a", "digit", "seven"]
    vocab = {w: i for i, w in enumerate([*words, *(w + "</w>" for w in words), "<|startoftext|>", "<|endoftext|>"])}
    (tmp / "tok").mkdir(parents=True, exist_ok=True)
    (tmp / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp / "tok" / "vocab.json"), str(tmp / "tok" / "merges.txt"),
                              model_max_length=16, pad_token="<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_load_lcm_pipeline_loads_lora_and_sets_lcm_scheduler(tmp_path: Path) -> None:
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = _tiny_sd_pipeline(tmp_path)
    # A tiny LoRA saved the diffusers way (random B so that it changes the output).
    unet = _tiny_sd_pipeline(tmp_path).unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    folder = tmp_path / "lora"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    (folder / "README.md").write_text(CARD)
    (folder / "lineage.json").write_text(json.dumps({"base": {"reference": "tiny", "family": "sd15"}}))
    (folder / "metrics.json").write_text(json.dumps({"gate": {"passed": True, "violations": []}}))
    reg = registry_at(str(tmp_path / "reg"), tmp_path)
    reg.publish(folder, "tiny-lcm-lora", alias="production")

    def sample(p) -> torch.Tensor:
        return p("a digit seven", num_inference_steps=4, guidance_scale=1.0, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images

    plain = sample(pipe)
    pipe = load_lcm_pipeline("tiny-lcm-lora@production", pipe, reg)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.get_active_adapters() == ["lcm"]
    with_lora = sample(pipe)
    assert with_lora.shape == (1, 3, 32, 32)
    assert not torch.allclose(plain, with_lora)  # the LoRA is really applied
    assert not list((tmp_path / "cache" / "checkouts").iterdir())  # temporary checkout removed


def test_lora_of_another_family_is_refused_and_the_checkout_removed(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    base = tmp_path / "base"
    _tiny_sd_pipeline(tmp_path).save_pretrained(base, safe_serialization=True)
    unet = _tiny_sd_pipeline(tmp_path).unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False))
    folder = tmp_path / "lora"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    (folder / "README.md").write_text(CARD)
    (folder / "lineage.json").write_text(json.dumps({"base": {"reference": "xl", "family": "sdxl"}}))
    reg = registry_at(str(tmp_path / "reg"), tmp_path)
    reg.publish(folder, "xl-lcm-lora")
    with pytest.raises(RegistryError, match="sdxl family cannot load into a sd15 base"):
        load_lcm_pipeline("xl-lcm-lora", str(base), reg)
    assert not list((tmp_path / "cache" / "checkouts").iterdir())  # temporary checkout removed


def test_fused_lora_gives_the_same_images(tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = _tiny_sd_pipeline(tmp_path).unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    folder = tmp_path / "lora"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    (folder / "README.md").write_text(CARD)
    (folder / "lineage.json").write_text(json.dumps({"base": {"reference": "tiny", "family": "sd15"}}))
    reg = registry_at(str(tmp_path / "reg"), tmp_path)
    reg.publish(folder, "tiny")

    def sample(p) -> torch.Tensor:
        return p("a digit seven", num_inference_steps=4, guidance_scale=1.0, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images

    adapter = sample(load_lcm_pipeline("tiny", _tiny_sd_pipeline(tmp_path), reg))
    fused_pipe = load_lcm_pipeline("tiny", _tiny_sd_pipeline(tmp_path), reg, fuse=True)
    assert fused_pipe.get_active_adapters() == []  # merged into the weights, no adapter layers left
    torch.testing.assert_close(sample(fused_pipe), adapter, atol=1e-4, rtol=0)
