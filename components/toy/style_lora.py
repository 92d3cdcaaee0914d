"""A style LoRA by plain diffusion fine-tuning (DDPM loss, no distillation) of a base's UNet.

This is how the style LoRAs that the LCM-LoRA report merges with its acceleration vector are
made (report Section 3.2: tau_style, trained on a style set with the usual noise-prediction
loss). For the toy world the style set is sklearn's digits in the toy style
(`toy_render.render_digit_styled`) with the plain captions, so the LoRA changes the look of
every digit prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.progress import Progress, ProgressFn

STYLE_ADAPTER = "style"


@dataclass(frozen=True)
class StyleTraining:
    rank: int = 16  # LoRA rank
    alpha: float = 8.0  # LoRA alpha (scale alpha / rank)
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2")
    steps: int = 1500  # optimizer steps
    batch_size: int = 64  # images per step
    lr: float = 2e-3  # AdamW learning rate
    seed: int = 0  # data order, noise and LoRA init
    caption_dropout: float = 0.1  # share of captions replaced by "" so the unconditional branch learns the style


def toy_style_set(count: int = 1797, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """sklearn digits in the toy style with their plain captions: N x 3 x 32 x 32 in [-1, 1], N captions."""
    from sklearn.datasets import load_digits

    from components.toy.render import caption_for, render_digit_styled

    digits = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(digits.images))[:count]
    arrays = [np.asarray(render_digit_styled(digits.images[i], rng), dtype=np.float32) for i in pick]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return images, [caption_for(int(digits.target[i])) for i in pick]


@dataclass(frozen=True)
class StyleInputs:
    """The style set as the UNet sees it, computed once: VAE latents (mean, scaled), text embeddings and,
    for SDXL, the pooled text embeddings and the micro-conditioning time ids (size, no crop, size)."""

    latents: torch.Tensor
    embeddings: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_kwargs(self, index: torch.Tensor, drop: torch.Tensor, empty: StyleInputs) -> dict:
        """The UNet's conditioning of rows `index`, the `drop` ones with the empty caption's."""
        kwargs = {"encoder_hidden_states": torch.where(drop[:, None, None], empty.embeddings, self.embeddings[index])}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.where(drop[:, None], empty.pooled, self.pooled[index]),
                                           "time_ids": self.time_ids[index]}
        return kwargs


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


@torch.no_grad()
def encode_style_set(pipe, images: torch.Tensor, captions: list[str], batch_size: int = 256) -> StyleInputs:
    """The style set's UNet inputs (`StyleInputs`), computed once; SD-1.5 and SDXL pipelines alike."""
    latents, embeddings, pooled = [], [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(pipe.vae.device, pipe.vae.dtype)
        latents.append(pipe.vae.encode(batch).latent_dist.mean * pipe.vae.config.scaling_factor)
        encoded = pipe.encode_prompt(captions[start:start + batch_size], device=pipe.unet.device,
                                     num_images_per_prompt=1, do_classifier_free_guidance=False)
        embeddings.append(encoded[0])
        if is_sdxl(pipe):
            pooled.append(encoded[2])
    if not pooled:
        return StyleInputs(torch.cat(latents).float(), torch.cat(embeddings).float())
    height, width = images.shape[-2:]
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(len(images), 1)
    return StyleInputs(torch.cat(latents).float(), torch.cat(embeddings).float(), torch.cat(pooled).float(), time_ids)


def diffusion_loss(unet, scheduler, latents: torch.Tensor, conditioning: dict,
                   generator: torch.Generator) -> torch.Tensor:
    """DDPM's simple loss: || target - unet(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, **conditioning) ||^2
    (eps or v)."""
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    prediction = unet(noisy, t, **conditioning).sample
    return F.mse_loss(prediction.float(), target.float())


def train_style_lora(pipe, images: torch.Tensor, captions: list[str], cfg: StyleTraining,
                     progress: ProgressFn | None = None) -> list[float]:
    """Add a LoRA adapter named `style` to `pipe.unet` and fit it to the style set; returns the losses.
    An SDXL pipeline's UNet gets its pooled text embeddings and time ids as well.

    The base weights stay frozen; the adapter stays loaded in `pipe` for the caller to save
    (`lora_io.adapter_factors(pipe, STYLE_ADAPTER)`).
    """
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    # 1. Frozen base, fixed inputs.
    torch.manual_seed(cfg.seed)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    inputs = encode_style_set(pipe, images, captions)
    empty = encode_style_set(pipe, images[:1], [""])  # the CFG unconditional conditioning
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # 2. The LoRA: B starts at zero, so step 0 is the base.
    pipe.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                                     init_lora_weights=True), adapter_name=STYLE_ADAPTER)
    params = [p for n, p in pipe.unet.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    pipe.unet.train()
    # 3. Plain diffusion fine-tuning over random mini-batches.
    for step in range(cfg.steps):
        count = inputs.latents.shape[0]
        index = torch.randint(0, count, (min(cfg.batch_size, count),), generator=generator)
        drop = torch.rand(len(index), generator=generator) < cfg.caption_dropout
        loss = diffusion_loss(pipe.unet, scheduler, inputs.latents[index], inputs.unet_kwargs(index, drop, empty),
                              generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"style LoRA: loss became {loss.item()} at step {step}; lower toy.style_lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(Progress(stage="style-lora", step=step + 1, total=cfg.steps, metrics={"loss": losses[-1]}))
    pipe.unet.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


def save_style_lora(pipe, out: Path, losses: list[float], base_meta: dict, title: str, description: str,
                    family: str = "sd15") -> dict[str, Path]:
    """The pipe's style adapter in both LoRA formats (alpha kept), and `losses.csv`, written to `out`;
    returns the LoRA files."""
    from components.lora import io as lora_io
    from components.lora import merge

    factors = lora_io.adapter_factors(pipe, STYLE_ADAPTER)
    paths = merge.save_lora_folder(out, factors, family=family, base_meta=base_meta, title=title,
                                   description=description)
    (out / "losses.csv").write_text("step,loss\n" + "".join(f"{i},{v:.6f}\n" for i, v in enumerate(losses)))
    return paths


def sample_with_and_without(pipe, prompts: list[str], guidance_scale: float, size: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """25-step DPM-Solver++ samples of `prompts` (seeds 0..) at `guidance_scale` and `size` px, with the
    pipe's style LoRA and without it: two N x 3 x size x size in [-1, 1]."""
    from components.evaluate.sampler_matrix import Method, initial_noise, latent_shape, run_method

    seeds = list(range(len(prompts)))
    noise = initial_noise(seeds, latent_shape(pipe, size, size))
    pipe.set_progress_bar_config(disable=True)
    method = Method("dpmpp", 25, guidance_scale, True)
    kw = {"height": size, "width": size, "batch_size": 50}
    with_lora = run_method(pipe, method, prompts, noise, seeds, **kw).images
    pipe.disable_lora()
    without = run_method(pipe, method, prompts, noise, seeds, **kw).images
    pipe.enable_lora()
    return with_lora, without


def run_toy_style_lora(params, output=None, progress: ProgressFn | None = None) -> dict:
    """`lcmlora toy style-lora`: train the toy style LoRA on the toy base and write its folder.

    The folder holds both LoRA formats (alpha kept), `losses.csv`, `metrics.json` (style strength
    of 25-step DPM-Solver++ samples with and without the LoRA) and the resolved params.
    """
    import json
    import time

    from components.config import RESOLVED_CONFIG_NAME
    from components.models.base_model import load_base, resolve_base
    from components.paths import project_path
    from components.toy.config import toy_config
    from components.toy.style_metric import toy_style_metric

    cfg = toy_config(params)
    out = Path(output or cfg.style_output)
    name, base_cfg = resolve_base(params, "toy") if "toy" in params.bases else ("toy", None)
    reference = str(project_path(base_cfg.reference if base_cfg else cfg.base_dir))
    loaded = load_base(reference, family="sd15")
    pipe = loaded.pipe
    # 1. Style set and training.
    t0 = time.perf_counter()
    images, captions = toy_style_set(seed=cfg.style_seed)
    training = StyleTraining(rank=cfg.style_rank, alpha=cfg.style_alpha, steps=cfg.style_steps,
                             batch_size=cfg.style_batch_size, lr=cfg.style_lr, seed=cfg.style_seed)
    losses = train_style_lora(pipe, images, captions, training, progress=progress)
    train_seconds = time.perf_counter() - t0
    # 2. Both formats, alpha kept (alpha != rank by default).
    base_meta = {"name": name, "family": "sd15", "resolution": cfg.image_size, "reference": reference,
                 "fingerprint": loaded.fingerprint}
    paths = save_style_lora(pipe, out, losses, base_meta, "toy-style-lora",
                            "toy style LoRA (neon digits), plain diffusion LoRA fine-tuning")
    # 3. Style strength with and without the LoRA, 25 DPM-Solver++ steps with the base's guidance.
    metric = toy_style_metric()
    prompts = [f"a handwritten digit {w}" for w in
               ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine") for _ in range(5)]
    with_lora, without = sample_with_and_without(pipe, prompts, base_cfg.guidance_scale if base_cfg else 2.0,
                                                 cfg.image_size)
    metrics = {
        "train_seconds": round(train_seconds, 1), "final_loss_mean_last50": float(np.mean(losses[-50:])),
        "first_loss_mean_first50": float(np.mean(losses[:50])),
        "style_strength_with_lora_dpmpp25": metric.mean_strength(with_lora),
        "style_strength_base_dpmpp25": metric.mean_strength(without),
        "style_metric_separation": metric.separation, "rank": cfg.style_rank, "alpha": cfg.style_alpha,
        "files": {k: str(v) for k, v in paths.items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / RESOLVED_CONFIG_NAME).write_text(params.to_yaml())
    return metrics
