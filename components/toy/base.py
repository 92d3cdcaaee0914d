"""The toy base: a tiny SD-1.5-family text-to-image model trained on the toy digits.

Architecture (all diffusers / transformers classes, so every stage treats it as a real base):
- `AutoencoderKL`, 3 blocks: 32x32 RGB <-> 4x8x8 latents (downsample x4).
- `UNet2DConditionModel`, ~1M parameters at 8x8 and 4x4, cross-attention at both resolutions.
- `CLIPTextModel`, 2 layers, width 64, seeded random init and frozen, with a local BPE
  tokenizer over the caption words (`components/toy/tokenizer.py`).
- SD-1.5 noise schedule (scaled_linear betas 0.00085..0.012, 1000 steps, epsilon prediction),
  shipped as a `DDIMScheduler`.

Training (`train_toy_base`): 1. render the digits, 2. train the VAE (reconstruction + small KL),
3. encode latents and set the scaling factor to 1/std, 4. train the UNet on the epsilon loss
with 10% caption dropout (for classifier-free guidance) and an EMA of its weights, sampling
DDIM-50 with CFG from the EMA every few hundred steps and keeping the checkpoint whose
samples the digit classifier recognises best.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from components.progress import Progress, ProgressFn
from components.toy.classifier import DigitClassifier, render_set
from components.toy.config import ToyConfig
from components.toy.render import caption_for
from components.toy.tokenizer import build_toy_tokenizer, write_tokenizer_files

TEXT_WIDTH = 64  # CLIP hidden size = UNet cross_attention_dim
MAX_TOKENS = 77  # CLIP context length, as SD 1.5



# --- architecture -----------------------------------------------------------------------


def toy_vae(seed: int = 0) -> AutoencoderKL:
    """Tiny KL autoencoder: 3x32x32 <-> 4x8x8 (two downsamples), ~0.3M parameters."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                         up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 32, 32],
                         layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=32)


def conditioned_unet(seed: int, sample_size: int, cross: tuple[bool, ...], widths: tuple[int, ...],
                     cross_attention_dim: int, **extra) -> UNet2DConditionModel:
    """A seeded 4-channel UNet2DConditionModel, one resnet per level: `cross[i]` puts cross-attention at
    level i (of `widths[i]` channels), mirrored on the way up; `extra` adds config (heads, SDXL's conditioning)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross),
        up_block_types=tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)),
        block_out_channels=widths, layers_per_block=1, cross_attention_dim=cross_attention_dim,
        norm_num_groups=16, **extra)


def toy_unet(seed: int = 0) -> UNet2DConditionModel:
    """Tiny SD-1.5-style UNet at 8x8 and 4x4, cross-attention at both, ~1.1M parameters."""
    return conditioned_unet(seed, 8, (True, True), (32, 64), TEXT_WIDTH, attention_head_dim=8)


def clip_text_config(tokenizer: CLIPTokenizer, width: int, positions: int, heads: int, projection_dim: int,
                     **extra) -> CLIPTextConfig:
    """A 2-layer CLIP text config of `width` (MLP 2 x width) over `tokenizer`'s vocabulary and special tokens."""
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=heads, max_position_embeddings=positions,
                          projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def clip_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0, positions: int = MAX_TOKENS) -> CLIPTextModel:
    """Tiny CLIP text encoder (2 layers, width 64, `positions` tokens), seeded random init."""
    torch.manual_seed(seed)
    return CLIPTextModel(clip_text_config(tokenizer, TEXT_WIDTH, positions, 4, TEXT_WIDTH))


def toy_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    """Tiny CLIP text encoder (2 layers, width 64), seeded random init, frozen."""
    return clip_text_encoder(tokenizer, seed).eval().requires_grad_(False)


def toy_scheduler() -> DDIMScheduler:
    """SD 1.5's noise schedule (scaled_linear, 0.00085..0.012, T=1000, epsilon) as a DDIM sampler."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def assemble_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                      tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    """The components as a StableDiffusionPipeline (no safety checker)."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=toy_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# --- math -------------------------------------------------------------------------------


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative ELBO of a KL autoencoder (Kingma & Welling 2014, eq. 10): ||x - D(z)||^2 + beta KL(q(z|x) || N(0, I)).

    images: Bx3xHxW in [-1, 1]; returns (loss, mse, kl) with kl averaged per latent element.
    """
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    mse = F.mse_loss(recon, images)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return mse + kl_weight * kl, mse, kl


def epsilon_loss(unet: UNet2DConditionModel, scheduler: DDPMScheduler | DDIMScheduler, latents: torch.Tensor,
                 text_embeddings: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDPM simple loss (Ho et al. 2020, eq. 14): E ||eps - eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t, c)||^2.

    latents: BxCxhxw scaled latents z0; text_embeddings: B x L x D.
    """
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    return F.mse_loss(unet(noisy, t, text_embeddings).sample, noise)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG (Ho & Salimans 2022, eq. 6): eps_u + w (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA warm-up: min(max_decay, (1 + step) / (10 + step)), so early averages forget the random init."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """theta_ema <- decay theta_ema + (1 - decay) theta, in place."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


# --- text and sampling ------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Prompts -> B x 77 x 64 last hidden states, as StableDiffusionPipeline encodes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@torch.no_grad()
def ddim_sample(unet: UNet2DConditionModel, vae: AutoencoderKL, cond: torch.Tensor, uncond: torch.Tensor,
                guidance_scale: float, steps: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (eta=0) with CFG, as StableDiffusionPipeline samples: B x 77 x 64 embeddings -> Bx3x32x32 in [-1, 1]."""
    scheduler = toy_scheduler()
    scheduler.set_timesteps(steps)
    b, size = cond.shape[0], unet.config.sample_size
    latents = torch.randn((b, unet.config.in_channels, size, size), generator=generator).to(cond.device)
    latents = latents * scheduler.init_noise_sigma
    embeddings = torch.cat([uncond.expand(b, -1, -1), cond])
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = unet(torch.cat([latents, latents]), t, embeddings).sample.chunk(2)
        latents = scheduler.step(classifier_free_guidance(eps_uncond, eps_cond, guidance_scale), t, latents).prev_sample
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1.0, 1.0)


@torch.no_grad()
def prompted_digit_accuracy(unet: UNet2DConditionModel, vae: AutoencoderKL, digit_embeddings: torch.Tensor,
                            uncond: torch.Tensor, classifier: DigitClassifier, n_samples: int,
                            guidance_scale: float, steps: int = 50, seed: int = 0, batch_size: int = 250) -> float:
    """Fraction of `n_samples` DDIM samples (digits 0-9 in turn) the classifier reads as the prompted digit.

    digit_embeddings: 10 x 77 x 64, the embedding of `caption_for(d)` for d = 0..9.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_samples) % 10
    hits = 0
    for i in range(0, n_samples, batch_size):
        batch = labels[i:i + batch_size]
        images = ddim_sample(unet, vae, digit_embeddings[batch], uncond, guidance_scale, steps, generator)
        hits += int((classifier.predict(images).cpu() == batch).sum())
    return hits / n_samples


# --- training ---------------------------------------------------------------------------


@dataclass
class ToyBaseResult:
    pipe: StableDiffusionPipeline
    guidance_scale: float  # the toy's own CFG scale, at which checkpoints were selected
    history: list[dict] = field(default_factory=list)  # one row per evaluation during training
    best_step: int = 0
    best_accuracy: float = 0.0
    final_accuracy: dict[str, float] = field(default_factory=dict)  # guidance scale -> accuracy
    vae_mse: float = 0.0


def report_progress(progress: ProgressFn | None, stage: str, step: int, total: int, metrics: dict) -> None:
    """One report of a training phase (toy-vae, hard-unet, ...) through the one progress channel."""
    if progress is not None:
        progress(Progress(stage=stage, step=step, total=total, metrics=metrics))


def train_vae(vae: AutoencoderKL, images: torch.Tensor, s, stage: str, progress: ProgressFn | None = None,
              checkpoint: Path | None = None) -> tuple[AutoencoderKL, float]:
    """Train `vae` on Nx3xHxW images in [-1, 1] (`s`: seed, device, vae_steps, vae_batch_size, vae_lr, kl_weight),
    resuming from and saving to `checkpoint` every 25 steps when given; returns (vae, final mse)."""
    vae = vae.to(s.device).train()
    generator = torch.Generator().manual_seed(s.seed + 1)  # batch indices: CPU, the same on every device
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.vae_lr, total_steps=s.vae_steps, pct_start=0.05)
    start_step, mse_avg, trained_s = 0, 0.0, 0.0
    started = time.time()
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu")  # generator states stay on the CPU
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        generator.set_state(state["generator"])
        start_step, mse_avg, trained_s = state["step"], state["mse"], state.get("trained_s", 0.0)
    for step in range(start_step + 1, s.vae_steps + 1):
        idx = torch.randint(0, len(images), (s.vae_batch_size,), generator=generator)
        loss, mse, kl = vae_loss(vae, images[idx].to(s.device), s.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        mse_avg = 0.95 * mse_avg + 0.05 * float(mse.detach()) if step > 1 else float(mse.detach())
        report_progress(progress, stage, step, s.vae_steps, {"mse": mse_avg, "kl": float(kl.detach())})
        if checkpoint is not None and (step % 25 == 0 or step == s.vae_steps):
            torch.save({"step": step, "vae": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "generator": generator.get_state(), "mse": mse_avg,
                        "trained_s": trained_s + time.time() - started}, checkpoint)
    return vae.eval().requires_grad_(False), mse_avg


def train_toy_vae(images: torch.Tensor, s: ToyConfig, progress: ProgressFn | None = None
                  ) -> tuple[AutoencoderKL, float]:
    """Train the toy VAE on Nx3x32x32 images in [-1, 1]; returns (vae, final mse)."""
    return train_vae(toy_vae(s.seed), images, s, "toy-vae", progress)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """VAE latent means (unscaled), N x 4 x 8 x 8, as contract 3 stores them."""
    device = next(vae.parameters()).device
    return torch.cat([vae.encode(images[i:i + batch_size].to(device)).latent_dist.mean.cpu()
                      for i in range(0, len(images), batch_size)])


def lr_at(step: int, s) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate over `train_steps`
    (`s`: lr, warmup_steps, train_steps)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.train_steps - s.warmup_steps))
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, model: torch.nn.Module, ema: torch.nn.Module,
                   step: int, s) -> None:
    """One step of the bases' recipe: AdamW at `lr_at(step - 1)`, gradients clipped to norm 1, then the EMA
    (`s`: lr, warmup_steps, train_steps, ema_decay)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step - 1, s)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    ema_update(ema, model, ema_decay_at(step, s.ema_decay))


def train_toy_unet(latents: torch.Tensor, labels: torch.Tensor, digit_embeddings: torch.Tensor,
                   uncond: torch.Tensor, vae: AutoencoderKL, classifier: DigitClassifier, s: ToyConfig,
                   guidance_scale: float, progress: ProgressFn | None = None) -> tuple[UNet2DConditionModel, list[dict], int, float]:
    """Train the UNet on scaled latents (N x 4 x 8 x 8) with labels (N,); returns the best EMA UNet.

    Every `eval_every` steps the EMA weights draw `eval_samples` DDIM-50 CFG samples; the EMA
    state whose samples the classifier recognises best is kept (ties go to the later step).
    """
    unet = toy_unet(s.seed).to(s.device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(toy_scheduler().config)
    generator = torch.Generator().manual_seed(s.seed + 2)
    opt = torch.optim.AdamW(unet.parameters(), lr=s.lr, weight_decay=1e-2)
    digit_embeddings, uncond = digit_embeddings.to(s.device), uncond.to(s.device)
    latents, labels = latents.to(s.device), labels.to(s.device)
    history: list[dict] = []
    best_state, best_step, best_acc = None, 0, -1.0
    loss_avg = 0.0
    for step in range(1, s.train_steps + 1):
        # 1. A batch of latents with their caption embeddings; caption dropout -> the empty prompt.
        idx = torch.randint(0, len(latents), (s.batch_size,), generator=generator).to(s.device)
        text = digit_embeddings[labels[idx]]
        dropped = torch.rand(s.batch_size, generator=generator) < s.caption_dropout
        text[dropped.to(s.device)] = uncond[0]
        # 2. One AdamW step on the epsilon loss, then the EMA.
        loss = epsilon_loss(unet, noise_scheduler, latents[idx], text)
        optimizer_step(opt, loss, unet, ema, step, s)
        loss_avg = 0.98 * loss_avg + 0.02 * float(loss.detach()) if step > 1 else float(loss.detach())
        metrics = {"loss": loss_avg, "best_acc": max(best_acc, 0.0)}
        # 3. Measure the EMA weights and keep the best.
        if step % s.eval_every == 0 or step == s.train_steps:
            acc = prompted_digit_accuracy(ema, vae, digit_embeddings, uncond, classifier, s.eval_samples,
                                          guidance_scale, seed=s.seed + 3)
            history.append({"step": step, "loss": loss_avg, "accuracy": acc})
            if acc >= best_acc:
                best_state, best_step, best_acc = copy.deepcopy(ema.state_dict()), step, acc
            metrics = {"loss": loss_avg, "acc": acc, "best_acc": best_acc}
        report_progress(progress, "toy-unet", step, s.train_steps, metrics)
    ema.load_state_dict(best_state)
    return ema, history, best_step, best_acc


def train_toy_base(images8: np.ndarray, labels: np.ndarray, classifier: DigitClassifier, s: ToyConfig,
                   guidance_scale: float, progress: ProgressFn | None = None) -> ToyBaseResult:
    """Train the whole toy base on 8x8 digits (N x 8 x 8, values 0-16) with labels (N,).

    Checkpoints are selected by prompted-digit accuracy at `guidance_scale` (the toy's own).
    """
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    classifier = classifier.to(s.device)
    # 1. Render: jittered plain copies (VAE and UNet) plus styled ones (VAE only).
    plain = torch.cat([render_set(images8, rng) for _ in range(s.copies)])
    plain_labels = torch.from_numpy(np.tile(np.asarray(labels), s.copies)).long()
    n_styled = round(len(plain) * s.style_fraction / (1.0 - s.style_fraction))
    styled_pick = rng.integers(0, len(images8), n_styled)
    styled = render_set(images8[styled_pick], rng, styled=True) if n_styled else plain[:0]
    # 2. The VAE.
    vae, vae_mse = train_toy_vae(torch.cat([plain, styled]), s, progress)
    # 3. Latents of the plain images, and the scaling factor that gives them unit variance.
    latents = encode_latents(vae, plain)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor
    # 4. Frozen text encoder: the ten captions and the empty prompt.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_toy_tokenizer(tmp, max_length=MAX_TOKENS)
    text_encoder = toy_text_encoder(tokenizer, s.seed)
    digit_embeddings = encode_prompts(tokenizer, text_encoder, [caption_for(d) for d in range(10)])
    uncond = encode_prompts(tokenizer, text_encoder, [""])
    # 5. The UNet, with EMA and best-checkpoint selection.
    unet, history, best_step, best_acc = train_toy_unet(latents, plain_labels, digit_embeddings, uncond, vae,
                                                        classifier, s, guidance_scale, progress)
    # 6. Accuracy of the chosen weights at several guidance scales.
    final = {}
    for i, scale in enumerate(s.final_guidance_scales):
        final[f"{scale:g}"] = prompted_digit_accuracy(unet, vae, digit_embeddings.to(s.device), uncond.to(s.device),
                                                      classifier, s.final_eval_samples, scale, seed=s.seed + 4)
        report_progress(progress, "toy-final", i + 1, len(s.final_guidance_scales), {f"acc@{scale:g}": final[f"{scale:g}"]})
    pipe = assemble_pipeline(vae.cpu(), unet.cpu(), text_encoder, tokenizer)
    return ToyBaseResult(pipe, guidance_scale, history, best_step, best_acc, final, vae_mse)


def save_toy_base(pipe: StableDiffusionPipeline, folder: str | Path) -> Path:
    """Save in diffusers layout (safetensors) plus the tokenizer's vocab.json / merges.txt."""
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    write_tokenizer_files(folder / "tokenizer")
    return folder
