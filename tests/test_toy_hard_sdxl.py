"""The SDXL-family hard toy architecture: micro-conditioning reaches the UNet, the pipeline runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.toy.hard.base import hard_vae, token_ids
from components.toy.hard.render import HARD_SIZE, Scene, caption_for
from components.toy.hard.sdxl import (
    build_untrained_hard_sdxl,
    encode_sdxl_prompt,
    random_crop,
    time_ids,
)


def test_random_crop_reports_original_size_and_crop():
    image = Image.new("RGB", (160, 128), (200, 10, 10))
    array, ids = random_crop(image, np.random.default_rng(0))
    assert array.shape == (3, HARD_SIZE, HARD_SIZE)
    assert ids[:2].tolist() == [128, 160] and ids[4:].tolist() == [HARD_SIZE, HARD_SIZE]
    assert ids[2] == 0 and 0 <= ids[3] <= 16  # 160x128 -> 80x64: only a sideways crop is possible


def test_micro_conditioning_reaches_the_unet(tmp_path):
    pipe = build_untrained_hard_sdxl(hard_vae(), tmp_path)
    torch.nn.init.normal_(pipe.unet.add_embedding.linear_1.weight, std=1.0)  # zero-free, so the path shows
    ids = token_ids(pipe.tokenizer, [caption_for(Scene(7, 0, 2, 2))])
    with torch.no_grad():
        embeds, pooled = encode_sdxl_prompt(pipe.text_encoder, pipe.text_encoder_2, ids)
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        outs = [pipe.unet(latents, 500, embeds, added_cond_kwargs={"text_embeds": pooled,
                                                                  "time_ids": time_ids(o, c)[None]}).sample
                for o, c in [((64, 64), (0, 0)), ((128, 160), (0, 0)), ((64, 64), (0, 12))]]
    assert embeds.shape == (1, 32, 64) and pooled.shape == (1, 32)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def test_sdxl_pipeline_generates_at_64(tmp_path):
    pipe = build_untrained_hard_sdxl(hard_vae(), tmp_path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe([caption_for(Scene(1, 1, 3, 3))], num_inference_steps=2, guidance_scale=5.0, height=HARD_SIZE,
               width=HARD_SIZE, original_size=(96, 96), crops_coords_top_left=(0, 0), output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, HARD_SIZE, HARD_SIZE)


def test_ddim_from_the_sdxl_scheduler_config_does_not_clip_latents():
    """Real SDXL's scheduler_config.json carries clip_sample: false; DDIM's default (true) clips the
    predicted latents to [-1, 1], which turned every DDIM image of the hard SDXL base to noise."""
    from diffusers import DDIMScheduler

    from components.toy.sdxl import sdxl_scheduler

    ddim = DDIMScheduler.from_config(sdxl_scheduler().config)
    assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
    committed = Path(__file__).resolve().parents[1] / "data/toy/hard/sdxl/scheduler"  # the committed base's
    assert DDIMScheduler.from_pretrained(committed).config.clip_sample is False


def test_committed_sdxl_base_draws_each_digit_on_its_side():
    import json

    from diffusers import StableDiffusionXLPipeline

    from components.toy.hard.evaluate import prompt_set, sample
    from components.toy.hard.judges import adherence, load_judges, swapped_sides

    root = Path(__file__).resolve().parents[1] / "data/toy/hard"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(root / "sdxl"))
    guidance = json.loads((root / "sdxl" / "training.json").read_text())["params"]["guidance_scale"]
    prompts = prompt_set(40, seed=12)
    images = sample(pipe, "dpm++", 50, prompts.captions, guidance, seed=0)
    judges = load_judges(root / "judges")
    # issue 12's rule asks teacher-50 adherence >= 0.8 (recorded on 200 prompts); 0.7 on these 40
    assert adherence(judges, images, prompts.parts) >= 0.7
    assert swapped_sides(judges, images, prompts.parts) <= 0.1  # each digit on the side its caption names
