"""Latent Consistency Distillation (LCM-LoRA report, arXiv 2311.05556, Algorithm 1), whole.

First the primitives, small pure functions each named after the paper's quantity; then the
composed step (`lcd_loss`), numbered by Algorithm 1's lines. Shapes: B batch, C latent
channels, h x w latent size, T training timesteps (1000), N solver timesteps (50).

Timesteps are the teacher's discrete DDPM timesteps 0..T-1. The DDIM solver Psi runs on the
N "trailing" timesteps t_n = (n + 1) k - 1 (k = T / N), so one solver step goes from t_n
to t_{n-1} = t_n - k (and from t_0 = k - 1 to timestep 0). Guidance follows the LCM form:
with w = (CFG scale - 1), guided = cond + w (cond - uncond) (Algorithm 1, line 5).

One UNet serves three roles: the student f_theta (LoRA on), the target f_theta- (the same
LoRA student under no_grad: LoRA LCD keeps no EMA network, so line 8's EMA is the identity),
and the teacher (adapters disabled: the frozen base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from components.lora.adapter import adapters_disabled
from components.models.conditioning import Conditioning

# --- primitives ---------------------------------------------------------------------------


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Per-sample values [B] -> [B, 1, ..., 1] with `ndim` dimensions, for broadcasting."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: str = "scaled_linear",
    trained_betas: list[float] | None = None,
) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float32 [T]; alpha(t)^2 = alpha_bar_t, sigma(t)^2 = 1 - alpha_bar_t.

    `scaled_linear` is Stable Diffusion's schedule (linear in sqrt(beta)). Computed in float32
    exactly as the teacher's diffusers scheduler does, so the solver matches its sampler.
    """
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    else:
        raise ValueError(
            f"beta_schedule {beta_schedule!r}: LCD supports 'linear', 'scaled_linear' or trained_betas; "
            "check the base's scheduler/scheduler_config.json"
        )
    return torch.cumprod(1.0 - betas, dim=0)


def schedule_from_scheduler_config(config: dict) -> Tensor:
    """alpha_bar [T] from a diffusers scheduler config (scheduler/scheduler_config.json)."""
    return alphas_cumprod(
        int(config.get("num_train_timesteps", 1000)),
        float(config.get("beta_start", 0.00085)),
        float(config.get("beta_end", 0.012)),
        str(config.get("beta_schedule", "scaled_linear")),
        config.get("trained_betas"),
    )


def ddim_solver_timesteps(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> Tensor:
    """Solver timesteps t_n = (n + 1) k - 1, n = 0..N-1, k = T / N (Algorithm 1's skipping interval); long [N]."""
    if num_train_timesteps % num_ddim_timesteps:
        raise ValueError(
            f"distill.num_ddim_timesteps={num_ddim_timesteps} must divide num_train_timesteps="
            f"{num_train_timesteps} so that the skipping interval k is an integer"
        )
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * k - 1


def previous_solver_timestep(t: Tensor, skip: int) -> Tensor:
    """t_{n-1} = t_n - k, clamped at timestep 0 for the first solver step; long [B]."""
    return (t - skip).clamp(min=0)


def add_noise(z0: Tensor, noise: Tensor, t: Tensor, alpha_bar: Tensor) -> Tensor:
    """Forward process z_t = alpha(t) z + sigma(t) eps (Algorithm 1, line 4: z_{t_{n+k}} ~ N(alpha z, sigma^2 I)).

    z0, noise: [B, C, h, w]; t: long [B]; alpha_bar: [T]. Returns [B, C, h, w] in z0's dtype.
    """
    a = append_dims(alpha_bar.to(z0.device)[t], z0.ndim)
    return (a.sqrt() * z0 + (1.0 - a).sqrt() * noise).to(z0.dtype)


def predicted_x0(model_output: Tensor, sample: Tensor, t: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """x0(z_t, t) from the UNet output: (z - sigma eps) / alpha for epsilon, alpha z - sigma v for v-prediction.

    model_output, sample: [B, C, h, w]; t: long [B].
    """
    a = append_dims(alpha_bar.to(sample.device)[t], sample.ndim)
    alpha, sigma = a.sqrt(), (1.0 - a).sqrt()
    if prediction_type == "epsilon":
        x0 = (sample - sigma * model_output) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * sample - sigma * model_output
    else:
        raise ValueError(f"prediction_type {prediction_type!r}: LCD supports 'epsilon' and 'v_prediction'")
    return x0.to(sample.dtype)


def predicted_epsilon(model_output: Tensor, sample: Tensor, t: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """eps(z_t, t) from the UNet output: the output itself, or alpha v + sigma z for v-prediction; [B, C, h, w]."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        a = append_dims(alpha_bar.to(sample.device)[t], sample.ndim)
        return (a.sqrt() * model_output + (1.0 - a).sqrt() * sample).to(sample.dtype)
    raise ValueError(f"prediction_type {prediction_type!r}: LCD supports 'epsilon' and 'v_prediction'")


def ddim_step(x0: Tensor, eps: Tensor, t_prev: Tensor, alpha_bar: Tensor) -> Tensor:
    """One deterministic DDIM step (eta = 0), the solver Psi: z_{t_prev} = alpha(t_prev) x0 + sigma(t_prev) eps.

    x0, eps: [B, C, h, w] (already guided, Algorithm 1 line 5); t_prev: long [B].
    """
    a = append_dims(alpha_bar.to(x0.device)[t_prev], x0.ndim)
    return (a.sqrt() * x0 + (1.0 - a).sqrt() * eps).to(x0.dtype)


def guided(cond: Tensor, uncond: Tensor, w: Tensor) -> Tensor:
    """Classifier-free guidance in LCM form: cond + w (cond - uncond), w = CFG scale - 1 (Algorithm 1, line 5); w: [B]."""
    return cond + append_dims(w, cond.ndim).to(cond.dtype) * (cond - uncond)


def sample_guidance_w(batch_size: int, scale_min: float, scale_max: float, generator: torch.Generator | None = None) -> Tensor:
    """omega ~ U[w_min, w_max] per sample (Algorithm 1, line 3), from CFG scales: w = scale - 1; float32 [B].

    scale_min == scale_max gives a fixed guidance.
    """
    u = torch.rand(batch_size, generator=generator, dtype=torch.float32)
    return (scale_min - 1.0) + (scale_max - scale_min) * u


def scalings_for_boundary_conditions(
    t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[Tensor, Tensor]:
    """c_skip = s^2 / ((10 t)^2 + s^2), c_out = 10 t / sqrt((10 t)^2 + s^2), so f(x, 0) = x (LCM boundary condition).

    t: [B] timesteps; returns two float [B] tensors.
    """
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.float(), c_out.float()


def consistency_function(sample: Tensor, x0: Tensor, c_skip: Tensor, c_out: Tensor) -> Tensor:
    """f_theta(z_t, t) = c_skip(t) z_t + c_out(t) x0(z_t, t) (the consistency model's parameterisation); [B, C, h, w]."""
    return append_dims(c_skip, sample.ndim).to(sample.dtype) * sample + append_dims(c_out, x0.ndim).to(x0.dtype) * x0


def pseudo_huber_loss(pred: Tensor, target: Tensor, c: float = 0.001) -> Tensor:
    """d(x, y) = sqrt(||x - y||^2 + c^2) - c elementwise, mean over all elements (LCM's pseudo-Huber); scalar."""
    diff = pred.float() - target.float()
    return (torch.sqrt(diff**2 + c**2) - c).mean()


def l2_loss(pred: Tensor, target: Tensor) -> Tensor:
    """d(x, y) = ||x - y||^2, mean over all elements; scalar."""
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def lcd_distance(pred: Tensor, target: Tensor, loss_type: str, huber_c: float = 0.001) -> Tensor:
    """The distance d(., .) of Algorithm 1, line 6, chosen by `distill.loss_type`."""
    if loss_type == "huber":
        return pseudo_huber_loss(pred, target, huber_c)
    if loss_type == "l2":
        return l2_loss(pred, target)
    raise ValueError(f"distill.loss_type {loss_type!r}: expected 'l2' or 'huber'")


def guidance_scale_embedding(w: Tensor, embedding_dim: int = 512) -> Tensor:
    """Sinusoidal embedding of w * 1000 [B] -> [B, D] (LCM's w-conditioning; unused by LCM-LoRA, which has no w input)."""
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    args = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if embedding_dim % 2 else emb


# --- the composed step (Algorithm 1, lines 3-6) ----------------------------------------------


@dataclass(frozen=True)
class LCDSettings:
    """Everything the step needs besides the networks, resolved from DistillConfig and BaseConfig."""

    family: str  # sd15 | sdxl
    prediction_type: str  # epsilon | v_prediction (from the base's scheduler unless params say)
    scaling_factor: float  # VAE latent scaling (latents in shards are unscaled)
    guidance_min: float  # CFG scale (w + 1); equal bounds: fixed guidance
    guidance_max: float
    num_train_timesteps: int = 1000
    num_ddim_timesteps: int = 50
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    loss_type: str = "huber"
    huber_c: float = 0.001

    @property
    def skip(self) -> int:
        """k = T / N, the skipping interval of the DDIM solver."""
        return self.num_train_timesteps // self.num_ddim_timesteps


@dataclass
class LCDSample:
    """The random draws of one step: solver index n, noise, guidance w, and the two timesteps."""

    t_start: Tensor  # t_{n+k} [B] (student timestep)
    t_prev: Tensor  # t_n [B] (one solver step earlier; target timestep)
    noise: Tensor  # [B, C, h, w]
    w: Tensor  # [B] guidance in LCM form (CFG scale - 1)


def draw_lcd_sample(latents: Tensor, s: LCDSettings, solver_timesteps: Tensor,
                    generator: torch.Generator, *, rank: int = 0, world_size: int = 1) -> LCDSample:
    """n ~ U{0..N-1}, noise, omega ~ [w_min, w_max] (Algorithm 1, line 3), drawn in this order on the CPU generator.

    Drawn for the global batch (B x world_size rows, B = latents' batch); this rank keeps rows
    [rank B, (rank + 1) B), so with the same generator on every rank, N ranks of batch B draw
    what one process of batch N B draws (and world_size 1 is the plain per-batch draw).
    """
    b = latents.shape[0]
    rows = slice(rank * b, (rank + 1) * b)
    index = torch.randint(0, len(solver_timesteps), (b * world_size,), generator=generator)[rows]
    t_start = solver_timesteps[index]
    noise = torch.randn((b * world_size, *latents.shape[1:]), generator=generator, dtype=torch.float32)[rows]
    w = sample_guidance_w(b * world_size, s.guidance_min, s.guidance_max, generator)[rows]
    dev = latents.device
    return LCDSample(t_start.to(dev), previous_solver_timestep(t_start, s.skip).to(dev),
                     noise.to(dev, latents.dtype), w.to(dev))


def teacher_solver_step(unet: Any, z_start: Tensor, d: LCDSample, cond: Conditioning, uncond: Conditioning,
                        s: LCDSettings, alpha_bar: Tensor) -> Tensor:
    """z_hat_{t_n} = Psi with guidance (Algorithm 1, line 5); z_start [B, C, h, w] -> [B, C, h, w].

    cond and uncond teacher passes run as one batched forward. `unet` is the unwrapped LoRA
    UNet; adapters are disabled here, so it is the frozen base.
    """
    with torch.no_grad(), adapters_disabled(unet):
        both = cond.cat(uncond)
        z_in = torch.cat([z_start, z_start]).to(both.embeds.dtype)
        out = unet(z_in, torch.cat([d.t_start, d.t_start]), **both.unet_kwargs()).sample
    out = out.float()
    z2, t2 = torch.cat([z_start, z_start]).float(), torch.cat([d.t_start, d.t_start])
    x0_c, x0_u = predicted_x0(out, z2, t2, alpha_bar, s.prediction_type).chunk(2)
    eps_c, eps_u = predicted_epsilon(out, z2, t2, alpha_bar, s.prediction_type).chunk(2)
    x0 = guided(x0_c, x0_u, d.w)
    eps = guided(eps_c, eps_u, d.w)
    return ddim_step(x0, eps, d.t_prev, alpha_bar)


def consistency_target(unet: Any, z_prev: Tensor, d: LCDSample, cond: Conditioning, s: LCDSettings,
                       alpha_bar: Tensor) -> Tensor:
    """f_theta-(z_hat_{t_n}, t_n) (Algorithm 1, line 6, right): the LoRA student under no_grad; [B, C, h, w]."""
    with torch.no_grad():
        out = unet(z_prev.to(cond.embeds.dtype), d.t_prev, **cond.unet_kwargs()).sample.float()
    x0 = predicted_x0(out, z_prev, d.t_prev, alpha_bar, s.prediction_type)
    c_skip, c_out = scalings_for_boundary_conditions(d.t_prev, s.sigma_data, s.timestep_scaling)
    return consistency_function(z_prev, x0, c_skip.to(z_prev.device), c_out.to(z_prev.device))


def student_prediction(unet: Any, z_start: Tensor, d: LCDSample, cond: Conditioning, s: LCDSettings,
                       alpha_bar: Tensor) -> Tensor:
    """f_theta(z_{t_{n+k}}, t_{n+k}) (Algorithm 1, line 6, left), gradients into the LoRA; [B, C, h, w]."""
    out = unet(z_start.to(cond.embeds.dtype), d.t_start, **cond.unet_kwargs()).sample.float()
    x0 = predicted_x0(out, z_start, d.t_start, alpha_bar, s.prediction_type)
    c_skip, c_out = scalings_for_boundary_conditions(d.t_start, s.sigma_data, s.timestep_scaling)
    return consistency_function(z_start, x0, c_skip.to(z_start.device), c_out.to(z_start.device))


def lcd_loss(student: Any, unet: Any, latents: Tensor, cond: Conditioning, uncond: Conditioning, s: LCDSettings,
             alpha_bar: Tensor, solver_timesteps: Tensor, generator: torch.Generator, *, rank: int = 0,
             world_size: int = 1) -> Tensor:
    """L(theta, theta-; Psi) of Algorithm 1 for one batch of scaled latents [B, C, h, w]; scalar.

    `student` is the (possibly DDP-wrapped) UNet used for the gradient pass; `unet` the same
    module unwrapped, used for the no-grad teacher and target passes. Under DDP, `rank` and
    `world_size` pick this process's rows of the global batch's draws (`draw_lcd_sample`).
    """
    # 1. Draws: n, noise, w; forward process to z_{t_{n+k}} (lines 3-4).
    d = draw_lcd_sample(latents, s, solver_timesteps, generator, rank=rank, world_size=world_size)
    z_start = add_noise(latents, d.noise, d.t_start, alpha_bar)
    # 2. Teacher: one guided DDIM step back to t_n (line 5), no gradients, adapters off.
    z_prev = teacher_solver_step(unet, z_start, d, cond, uncond, s, alpha_bar)
    # 3. Target from the same LoRA student under no_grad (line 6, right; no EMA for LoRA).
    target = consistency_target(unet, z_prev, d, cond, s, alpha_bar)
    # 4. Student with gradients last, so no activations are held during the no-grad passes (line 6, left).
    pred = student_prediction(student, z_start, d, cond, s, alpha_bar)
    # 5. The distance d(f_theta, f_theta-) (line 6); the trainer takes the gradient step (line 7).
    return lcd_distance(pred, target, s.loss_type, s.huber_c)
