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
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from components.progress import Progress, ProgressFn
from components.toy.base import ema_decay_at, ema_update, epsilon_loss, toy_scheduler, vae_loss
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
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=HARD_SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8, norm_num_groups=16)


def hard_text_encoder(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    """CLIP text encoder (2 layers, width 64, 32 positions), seeded random init."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                            projection_dim=TEXT_WIDTH, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


def assemble_hard_pipeline(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                           tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    """The components as a StableDiffusionPipeline with SD-1.5's DDIM schedule (no safety checker)."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval().requires_grad_(False),
                                   tokenizer=tokenizer, unet=unet.eval().requires_grad_(False),
                                   scheduler=toy_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> B x 32 token ids, padded as StableDiffusionPipeline pads them."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def lr_at(step: int, s: HardToyConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate over `train_steps`."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = min(1.0, (step - s.warmup_steps) / max(1, s.train_steps - s.warmup_steps))
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def trainable(models: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (a frozen text encoder's do not)."""
    return [p for p in models.parameters() if p.requires_grad]


def _report(progress: ProgressFn | None, stage: str, step: int, total: int, metrics: dict) -> None:
    if progress is not None:
        progress(Progress(stage=stage, step=step, total=total, metrics=metrics))


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
    vae = hard_vae(s.seed).to(s.device).train()
    generator = torch.Generator().manual_seed(s.seed + 1)  # batch indices: CPU, the same on every device
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.vae_lr, total_steps=s.vae_steps, pct_start=0.05)
    start_step, mse_avg, trained_s = 0, 0.0, 0.0
    started = time.time()
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu")  # generator states stay on the CPU
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
        _report(progress, "hard-vae", step, s.vae_steps, {"mse": mse_avg, "kl": float(kl.detach())})
        if step % 25 == 0 or step == s.vae_steps:
            torch.save({"step": step, "vae": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "generator": generator.get_state(), "mse": mse_avg,
                        "trained_s": trained_s + time.time() - started}, ckpt)
    return vae.eval().requires_grad_(False)


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
        _report(progress, "hard-decoder", step, s.decoder_steps, {"mse": mse_avg})
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """VAE latent means (unscaled), N x 4 x 16 x 16."""
    device = next(vae.parameters()).device
    return torch.cat([vae.encode(images[i:i + batch_size].to(device)).latent_dist.mean.cpu()
                      for i in range(0, len(images), batch_size)])


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
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, s)
        loss = epsilon_loss(unet, noise_scheduler, latents[idx].to(s.device),
                            text_encoder(batch_ids.to(s.device))[0], noise_generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        ema_update(ema, models, ema_decay_at(step, s.ema_decay))
        loss_avg = 0.98 * loss_avg + 0.02 * float(loss.detach()) if step > 1 else float(loss.detach())
        _report(progress, "hard-unet", step, s.train_steps, {"loss": loss_avg})
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
