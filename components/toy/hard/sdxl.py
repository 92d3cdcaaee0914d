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
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from components.toy.hard.base import MAX_TOKENS, hard_tokenizer
from components.toy.hard.render import HARD_SIZE
from components.toy.sdxl import assemble_sdxl, sdxl_text_encoders, sdxl_unet

TEXT_WIDTHS = (32, 32)  # hidden sizes of text_encoder and text_encoder_2
POOLED_DIM = 32  # projection_dim of text_encoder_2 ("text_embeds")
TIME_EMBED_DIM = 8  # addition_time_embed_dim; six size/crop numbers are embedded


def hard_sdxl_text_encoders(tokenizer: CLIPTokenizer, seed: int = 0
                            ) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """The two CLIP text encoders (width 32 each; the second with a 32-d pooled projection)."""
    return sdxl_text_encoders((tokenizer, tokenizer), TEXT_WIDTHS, POOLED_DIM, MAX_TOKENS, seed)


def hard_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL-style UNet at 16x16, 8x8 and 4x4 latents: text_time added conditioning, linear projections.

    Three levels for the same reason as the SD-1.5 family's (`components/toy/hard/base.py:hard_unet`).
    """
    return sdxl_unet(seed, HARD_SIZE // 4, (False, True, True), (32, 64, 64), (2, 4, 4), sum(TEXT_WIDTHS), POOLED_DIM,
                     TIME_EMBED_DIM)


def assemble_hard_sdxl(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                       text_encoder_2: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer
                       ) -> StableDiffusionXLPipeline:
    """The components as a StableDiffusionXLPipeline (one tokenizer serves both encoders)."""
    return assemble_sdxl(vae, unet, text_encoder, text_encoder_2, tokenizer, tokenizer)


def encode_sdxl_prompt(text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection,
                       ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B x 32 ids -> (B x 16 x 64 penultimate states of both encoders, B x 32 pooled), as SDXL encodes."""
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
    # Drawn on the CPU generator, then moved: the same draws on every device.
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    pred = unet(noisy, t, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids}).sample
    return torch.nn.functional.mse_loss(pred, noise)


def build_untrained_hard_sdxl(vae: AutoencoderKL, folder: str | Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """The SDXL-family architecture around a trained hard VAE, untrained (training: not yet written)."""
    tokenizer = hard_tokenizer(Path(folder) / "tokenizer")
    text_encoder, text_encoder_2 = hard_sdxl_text_encoders(tokenizer, seed)
    return assemble_hard_sdxl(vae, hard_sdxl_unet(seed + 2), text_encoder, text_encoder_2, tokenizer)


def sdxl_training_set(images8: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator,
                      layout: str = "narrow") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`n` scenes at varied original sizes, randomly cropped: (N x 3 x 64 x 64, N x 6 time ids, captions)."""
    from components.toy.hard.render import caption_for, random_scene, render_scene
    from components.toy.hard.source import original_canvas

    arrays, ids, captions = [], [], []
    for _ in range(n):
        scene, i, j, right_first = random_scene(labels, rng)
        canvas = original_canvas(render_scene(images8[i], images8[j], scene, rng, layout=layout), rng)
        array, add_time_ids = random_crop(canvas, rng)
        arrays.append(array)
        ids.append(add_time_ids)
        captions.append(caption_for(scene, right_first))
    return torch.from_numpy(np.stack(arrays)), torch.stack(ids), captions


def train_hard_sdxl_unet(pipe: StableDiffusionXLPipeline, latents: torch.Tensor, ids: torch.Tensor,
                         add_time_ids: torch.Tensor, s, progress=None) -> int:
    """Train the UNet (and both text encoders unless `text_frozen`) in place on scaled latents (N x 4 x 16 x 16), ids (N x 32), time ids (N x 6).

    Same recipe as the SD-1.5 family (`components/toy/hard/base.py:train_hard_unet`): caption
    dropout (zeroed embeddings, as SDXL's empty prompt), AdamW with warm-up and cosine decay, an EMA copied into the
    pipeline at the end, stopped at `budget_s`; every `eval_every` steps the full state is saved to
    `checkpoint_dir/sdxl-last.pt` (and the EMA to `sdxl-ema-STEP.pt`), and a rerun resumes from it.
    Returns the step reached.
    """
    import copy
    import time
    from pathlib import Path

    from components.toy.base import optimizer_step, report_progress, toy_scheduler
    from components.toy.hard.base import resume_training_state, save_training_state, trainable

    models = torch.nn.ModuleDict({"unet": pipe.unet, "text": pipe.text_encoder, "text_2": pipe.text_encoder_2})
    models.to(s.device).train().requires_grad_(True)
    if s.text_frozen:
        for name in ("text", "text_2"):
            models[name].eval().requires_grad_(False)
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(toy_scheduler().config)
    generator = torch.Generator().manual_seed(s.seed + 12)
    opt = torch.optim.AdamW(trainable(models), lr=s.lr, weight_decay=1e-2)
    folder = Path(s.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    state = resume_training_state(folder / "sdxl-last.pt", models, ema, opt, {"generator": generator})
    start_step = state["step"] if state else 0
    trained_s = state.get("trained_s", 0.0) if state else 0.0  # wall time of earlier (resumed) runs
    started, step = time.time(), start_step
    for step in range(start_step + 1, s.train_steps + 1):
        idx = torch.randint(0, len(latents), (s.batch_size,), generator=generator)
        dropped = torch.rand(s.batch_size, generator=generator) < s.caption_dropout
        embeds, pooled = encode_sdxl_prompt(models["text"], models["text_2"], ids[idx].to(s.device))
        # A dropped caption is all-zero embeddings: what the pipeline's force_zeros_for_empty_prompt feeds
        # the unconditional branch of CFG (Podell et al. 2023 trained SDXL so).
        keep = (~dropped).to(s.device, embeds.dtype)
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        loss = sdxl_epsilon_loss(models["unet"], noise_scheduler, latents[idx].to(s.device), embeds, pooled,
                                 add_time_ids[idx].to(s.device), generator)
        optimizer_step(opt, loss, models, ema, step, s)
        report_progress(progress, "hard-sdxl-unet", step, s.train_steps, {"loss": float(loss.detach())})
        over_budget = time.time() - started > s.budget_s
        if step % s.eval_every == 0 or step == s.train_steps or over_budget:
            torch.save({"step": step, "ema": ema.state_dict()}, folder / f"sdxl-ema-{step:06d}.pt")
            save_training_state(folder / "sdxl-last.pt", step, models, ema, opt, {"generator": generator},
                                trained_s=trained_s + time.time() - started)
        if over_budget:
            break
    models.load_state_dict(ema.state_dict())
    models.eval().requires_grad_(False)
    return step
