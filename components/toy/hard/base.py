"""The SD-1.5-family hard toy base: 64x64 images, 4x16x16 latents, compositional prompts.

Architecture (diffusers / transformers classes, so every stage treats it as a real base):
- `AutoencoderKL`, 3 blocks (16, 32, 32): 3x64x64 <-> 4x16x16.
- `UNet2DConditionModel` (32, 64, 64): plain resnets at 16x16, cross-attention at 8x8, 4x4 and in the
  mid block (cross_attention_dim 64).
- `CLIPTextModel`, 2 layers, width 64, 32 positions (captions are up to 25 tokens), trained with
  the UNet; a local BPE tokenizer over the caption words.
- SD-1.5's noise schedule as a `DDIMScheduler` (`components/toy/base.py:toy_scheduler`).

Training (`train_hard_vae`, `train_hard_unet`) checkpoints to `checkpoint_dir` every few
hundred steps and resumes from there, and the UNet phase stops at its wall-clock budget.
Checkpoints are not selected here: `components/toy/hard/evaluate.py` measures them.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from components.progress import ProgressFn
from components.toy.base import (
    assemble_pipeline,
    clip_text_encoder,
    conditioned_unet,
    epsilon_loss,
    optimizer_step,
    report_progress,
    toy_scheduler,
    train_vae,
)
from components.toy.base import encode_latents as encode_toy_latents
from components.toy.hard.config import HardToyConfig
from components.toy.hard.render import HARD_SIZE, HARD_WORDS
from components.toy.tokenizer import build_toy_tokenizer

TEXT_WIDTH = 64  # CLIP hidden size = UNet cross_attention_dim
MAX_TOKENS = 32  # CLIP context length: the longest caption is 25 tokens ("green", "three" split)


def hard_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """The local CLIP tokenizer over the hard captions' words, its files written to `folder`."""
    return build_toy_tokenizer(folder, words=HARD_WORDS, max_length=MAX_TOKENS)


def hard_vae(seed: int = 0) -> AutoencoderKL:
    """KL autoencoder 3x64x64 <-> 4x16x16 (two downsamples), ~0.24M parameters."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                         up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32],
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=HARD_SIZE)


def hard_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD-1.5-style UNet at 16x16, 8x8 and 4x4 latents, cross-attention at 8x8, 4x4 and mid, ~1.7M parameters.

    The 4x4 level is there for left and right: its convolutions see the zero-padded border from
    every column, so the cross-attention queries know their side. The 2-level UNet before it
    (mid block at 8x8) drew the right digits and colours but on a random side (docs/toy-hard.md).
    """
    return conditioned_unet(seed, HARD_SIZE // 4, (False, True, True), (32, 64, 64), TEXT_WIDTH, attention_head_dim=8)


def hard_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    """CLIP text encoder (2 layers, width 64, 32 positions), seeded random init."""
    return clip_text_encoder(tokenizer, seed, MAX_TOKENS)


def assemble_hard_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                           tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    """The components, frozen, as a StableDiffusionPipeline with SD-1.5's DDIM schedule (no safety checker)."""
    return assemble_pipeline(vae, unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False),
                             tokenizer)


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> B x 32 token ids, padded as StableDiffusionPipeline pads them."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def trainable(models: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (a frozen text encoder's do not)."""
    return [p for p in models.parameters() if p.requires_grad]


def save_training_state(path: Path, step: int, models: torch.nn.Module, ema: torch.nn.Module,
                        opt: torch.optim.Optimizer, generators: dict[str, torch.Generator], **extra) -> None:
    """A resumable checkpoint of a hard-toy UNet phase: models, EMA, optimizer, generator states, step."""
    torch.save({"step": step, "models": models.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                **{name: g.get_state() for name, g in generators.items()}, **extra}, path)


def resume_training_state(path: Path, models: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                          generators: dict[str, torch.Generator]) -> dict | None:
    """Load `save_training_state`'s checkpoint into the training objects in place; its dict, or None if absent.

    Loaded on the CPU (generator states must stay there); `load_state_dict` copies onto the models' device.
    """
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu")
    models.load_state_dict(state["models"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    for name, generator in generators.items():
        if name in state:
            generator.set_state(state[name])
    return state


def train_hard_vae(images: torch.Tensor, s: HardToyConfig, progress: ProgressFn | None = None) -> AutoencoderKL:
    """Train the VAE on Nx3x64x64 images in [-1, 1], checkpointing to (and resuming from) `vae.pt`."""
    ckpt = Path(s.checkpoint_dir) / "vae.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    return train_vae(hard_vae(s.seed), images, s, "hard-vae", progress, checkpoint=ckpt)[0]


def finetune_decoder(vae: AutoencoderKL, images: torch.Tensor, s: HardToyConfig,
                     progress: ProgressFn | None = None) -> AutoencoderKL:
    """Fine-tune the decoder (and post_quant_conv) of `vae` for `s.decoder_steps` steps of pixel MSE on
    Nx3x64x64 images in [-1, 1], decoding the frozen encoder's latent means: the latent space (and a UNet
    trained on it) is unchanged, only what is drawn from it improves. Deterministic for `s.seed`."""
    if s.decoder_steps == 0:
        return vae
    trainable = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.requires_grad_(False).train()
    for p in trainable:
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(s.seed + 3)  # batch indices: CPU, the same on every device
    opt = torch.optim.AdamW(trainable, lr=s.decoder_lr, weight_decay=0.0)
    mse_avg = 0.0
    for step in range(1, s.decoder_steps + 1):
        batch = images[torch.randint(0, len(images), (s.vae_batch_size,), generator=generator)].to(s.device)
        with torch.no_grad():
            latents = vae.encode(batch).latent_dist.mean
        mse = F.mse_loss(vae.decode(latents).sample, batch)
        opt.zero_grad(set_to_none=True)
        mse.backward()
        opt.step()
        mse_avg = 0.95 * mse_avg + 0.05 * float(mse.detach()) if step > 1 else float(mse.detach())
        report_progress(progress, "hard-decoder", step, s.decoder_steps, {"mse": mse_avg})
    return vae.eval().requires_grad_(False)


def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """VAE latent means (unscaled), N x 4 x 16 x 16, 256 images at a time."""
    return encode_toy_latents(vae, images, batch_size=256)


def train_hard_unet(latents: torch.Tensor, ids: torch.Tensor, uncond_ids: torch.Tensor,
                    text_encoder: CLIPTextModel, s: HardToyConfig, progress: ProgressFn | None = None
                    ) -> tuple[UNet2DConditionModel, CLIPTextModel, int]:
    """Train the UNet (and the text encoder unless `text_frozen`) on scaled latents (N x 4 x 16 x 16)
    and caption ids (N x 32).

    10% of captions become the empty prompt (for CFG); an EMA of both models is kept and
    checkpointed every `eval_every` steps (`unet-STEP.pt`, `last.pt` to resume). Returns the
    EMA models and the step reached (the wall-clock budget may stop it before `train_steps`).
    """
    folder = Path(s.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    unet = hard_unet(s.seed).to(s.device).train()
    text_encoder.to(s.device).train(not s.text_frozen).requires_grad_(not s.text_frozen)
    models = torch.nn.ModuleDict({"unet": unet, "text": text_encoder})
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(toy_scheduler().config)
    generator = torch.Generator().manual_seed(s.seed + 2)  # indices and dropout: CPU, the same on every device
    noise_generator = generator if s.device == "cpu" else torch.Generator(s.device).manual_seed(s.seed + 3)
    opt = torch.optim.AdamW(trainable(models), lr=s.lr, weight_decay=1e-2)
    generators = {"generator": generator} | ({} if noise_generator is generator else {"noise_generator": noise_generator})
    state = resume_training_state(folder / "last.pt", models, ema, opt, generators)
    start_step, loss_avg = (state["step"], state["loss"]) if state else (0, 0.0)
    trained_s = state.get("trained_s", 0.0) if state else 0.0  # wall time of earlier (resumed) runs
    started = time.time()
    step = start_step
    for step in range(start_step + 1, s.train_steps + 1):
        # 1. A batch of latents with their captions; caption dropout -> the empty prompt.
        idx = torch.randint(0, len(latents), (s.batch_size,), generator=generator)
        batch_ids = ids[idx].clone()
        dropped = torch.rand(s.batch_size, generator=generator) < s.caption_dropout
        batch_ids[dropped] = uncond_ids[0]
        # 2. One AdamW step on the epsilon loss through UNet and text encoder, then the EMA.
        loss = epsilon_loss(unet, noise_scheduler, latents[idx].to(s.device),
                            text_encoder(batch_ids.to(s.device))[0], noise_generator)
        optimizer_step(opt, loss, models, ema, step, s)
        loss_avg = 0.98 * loss_avg + 0.02 * float(loss.detach()) if step > 1 else float(loss.detach())
        report_progress(progress, "hard-unet", step, s.train_steps, {"loss": loss_avg})
        over_budget = time.time() - started > s.budget_s
        if step % s.eval_every == 0 or step == s.train_steps or over_budget:
            torch.save({"step": step, "ema": ema.state_dict(), "loss": loss_avg}, folder / f"ema-{step:06d}.pt")
            save_training_state(folder / "last.pt", step, models, ema, opt, generators, loss=loss_avg,
                                trained_s=trained_s + time.time() - started)
        if over_budget:
            break
    return ema["unet"], ema["text"], step


def encode_ids(text_encoder: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    """B x 32 ids -> B x 16 x 64 last hidden states (as the pipeline's prompt embeddings)."""
    with torch.no_grad():
        return text_encoder(ids)[0]


def load_ema(path: str | Path, tokenizer: CLIPTokenizer, s: HardToyConfig
             ) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """The EMA UNet and text encoder of a checkpoint written by `train_hard_unet`."""
    models = torch.nn.ModuleDict({"unet": hard_unet(s.seed), "text": hard_text_encoder(tokenizer, s.seed)})
    models.load_state_dict(torch.load(path)["ema"])
    return models["unet"].eval().requires_grad_(False), models["text"].eval().requires_grad_(False)


def trained_seconds(checkpoint: Path) -> float | None:
    """Wall seconds of training summed over every run that wrote `checkpoint` (resumes included)."""
    if not checkpoint.exists():
        return None
    value = torch.load(checkpoint, map_location="cpu").get("trained_s")
    return None if value is None else round(float(value), 1)


def unit_variance_scale(latents: torch.Tensor) -> float:
    """SD's VAE scaling factor for this data: 1 / std of the training latents."""
    return float(1.0 / latents.std())


def scaled_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared difference, a float (for reports)."""
    return float(F.mse_loss(a, b))
