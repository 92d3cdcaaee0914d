"""Phased Consistency Distillation (PCM, Wang et al., arXiv 2405.18407), a sibling of lcd.py's Algorithm 1.

First the primitives, small pure functions each named after the paper's quantity; then the
composed step (`pcm_loss`), with the inputs of `lcd.lcd_loss`. Shapes as in lcd.py: B batch,
C latent channels, h x w latent size, T training timesteps (1000), N solver timesteps (50),
M phases. "Reference" is the authors' code, G-U-N/Phased-Consistency-Model at b127277,
code/text_to_image_sd15/train_pcm_lora_sd15.py (`DDIMSolver.ddim_style_multiphase_pred`,
`scalings_for_boundary_conditions_{online,target}` and the training step, section 20.4).

Phases. The DDIM solver grid of lcd.py (t_n = (n + 1) k - 1, n = 0..N-1) is split at the solver
indices i_m = floor(m N / M), m = 0..M-1 (the reference's `inference_indices`). Edge s_m is the
solver's previous timestep at i_m, so s_0 = 0, s_m = t_{i_m - 1} for m >= 1, and s_M = t_{N-1} = T - 1
closes the last phase. Phase m holds the timesteps s_m < t <= s_{m+1} (t = 0 counts as phase 0):
an upper edge belongs to the phase below it, and is where the sampler evaluates the model.

Consistency function. f^m(x_t, t) is the DDIM jump from t to the phase's lower edge s_m, with the
model's own x0 and epsilon: alpha(s_m) x0 + sigma(s_m) eps, the paper's DDIM-form
parameterisation, which gives f^m(x_{s_m}, s_m) = x_{s_m} by itself. On top, the reference's hard
boundary scalings c_skip = 1[t = s_m], c_out = 1 - c_skip make that identity exact in floating
point (the online student always has t > s_m, so c_skip = 0 there; LCD's soft scalings with
timestep_scaling 10 are not used). s_0 = 0 jumps to timestep 0 with alpha_bar_0 = 1 - beta_0 (the
reference's `alpha_cumprods[0]`, diffusers' set_alpha_to_one=False), so even the lowest phase
keeps sigma(0) eps, sigma(0) ~ 0.029 for SD; tests/test_pcm.py shows what one phase reduces to.
eps is `lcd.predicted_epsilon` of the output: the reference jumps with the raw output, which is
the same for epsilon prediction and would be v, not eps, for a v-prediction base.

The function depends on the phase, not on t alone (x at t = s_m is the identity's input in phase
m and a point of phase m - 1), so the step fixes the edge once, from the student's timestep, and
maps the target there too (the reference passes the student's solver index to both).

One UNet serves three roles, as in lcd.py: the student (LoRA on), the target (the same LoRA UNet
under no_grad, no EMA, as the reference does) and the teacher (adapters disabled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from components.distill.lcd import (
    LCDSample,
    LCDSettings,
    add_noise,
    append_dims,
    ddim_solver_timesteps,
    ddim_step,
    draw_lcd_sample,
    lcd_distance,
    predicted_epsilon,
    predicted_x0,
    teacher_solver_step,
)
from components.models.conditioning import Conditioning

# --- primitives ---------------------------------------------------------------------------


def phase_edge_indices(num_ddim_timesteps: int, phases: int) -> Tensor:
    """Solver indices i_m = floor(m N / M), m = 0..M-1, where the phases start (reference: `inference_indices`); long [M].

    Computed as the reference does, floor(m * (N / M)) in float64 (numpy's linspace), which for a
    few pairs (N=30, M=22) is one index below the exact integer floor(m N / M).
    """
    if not 1 <= phases <= num_ddim_timesteps:
        raise ValueError(
            f"distill.pcm_phases={phases} must be between 1 and distill.num_ddim_timesteps={num_ddim_timesteps} "
            "(each phase needs at least one solver step)"
        )
    return torch.floor(torch.arange(phases, dtype=torch.float64) * (num_ddim_timesteps / phases)).long()


def phase_edges(solver_timesteps: Tensor, phases: int) -> Tensor:
    """Edges s_0 = 0 < s_1 < ... < s_M = T - 1 on the solver grid `lcd.ddim_solver_timesteps` [N]; long [M + 1].

    s_m is the solver's previous timestep at index i_m (the reference's `ddim_timesteps_prev`).
    """
    grid = solver_timesteps.long().cpu()
    previous = torch.cat([grid.new_zeros(1), grid[:-1]])  # t_{n-1}, with timestep 0 before t_0
    return torch.cat([previous[phase_edge_indices(len(grid), phases)], grid[-1:]])


def phase_of(t: Tensor, edges: Tensor) -> Tensor:
    """Phase m with s_m < t <= s_{m+1} (t = 0 in phase 0); t: long [B], edges: [M + 1]; long [B]."""
    return torch.searchsorted(edges[1:-1].to(t.device), t, right=False)


def lower_edge(t: Tensor, edges: Tensor) -> Tensor:
    """s_m, the lower edge of t's phase, where f^m maps x_t (reference: `ddim_style_multiphase_pred`'s end timestep); long [B]."""
    return edges.to(t.device)[phase_of(t, edges)]


def clipped_solver_step(t: Tensor, skip: int, edge: Tensor) -> Tensor:
    """t_prev = max(t - k, s_m): one solver step back that never leaves the phase; long [B].

    On the grid it equals lcd.previous_solver_timestep (t - k, clamped at 0), as the reference
    steps: the edges are grid points, so t - k >= s_m whenever t > s_m.
    """
    return torch.maximum(t - skip, edge)


def phase_boundary_scalings(t: Tensor, edge: Tensor) -> tuple[Tensor, Tensor]:
    """c_skip = 1[t = s_m], c_out = 1 - c_skip (reference: `scalings_for_boundary_conditions_{target,online}`); float [B] each."""
    c_skip = (t == edge).float()
    return c_skip, 1.0 - c_skip


def phased_consistency_function(sample: Tensor, x0: Tensor, eps: Tensor, t: Tensor, edge: Tensor,
                                alpha_bar: Tensor) -> Tensor:
    """f^m(x_t, t) = c_skip x_t + c_out DDIM(x_t, t -> s_m), DDIM = alpha(s_m) x0 + sigma(s_m) eps (lcd.ddim_step to s_m).

    sample, x0, eps: [B, C, h, w] (x0 and eps from the same model output); t, edge: long [B].
    """
    c_skip, c_out = phase_boundary_scalings(t, edge)
    jump = ddim_step(x0, eps, edge, alpha_bar)
    return append_dims(c_skip, sample.ndim).to(sample.dtype) * sample + append_dims(c_out, jump.ndim).to(jump.dtype) * jump


def pcm_sampling_timesteps(num_steps: int, num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> Tensor:
    """Deterministic phased sampling, one step per phase: [s_M, ..., s_1], each step jumps to the next, the last to s_0 = 0; long [S].

    The upper edges of a `num_steps`-phase split (num_steps = distill.pcm_phases: the trained
    split). diffusers' TCDScheduler(timesteps=these).step(eta=0) is this sampler exactly; its
    `num_inference_steps=S` and DDIMScheduler(trailing) choose these only when S divides N.
    """
    edges = phase_edges(ddim_solver_timesteps(num_train_timesteps, num_ddim_timesteps), num_steps)
    return edges[1:].flip(0)


# --- the composed step (the reference's section 20.4; lcd.py's Algorithm 1 with phases) ------


@dataclass(frozen=True)
class PCMSettings(LCDSettings):
    """LCDSettings plus the phases; `pcm_loss` takes it where `lcd.lcd_loss` takes LCDSettings."""

    pcm_phases: int = 4  # M, sub-trajectories of the solver grid (reference: --multiphase; 4 in its scripts)
    pcm_adversarial: bool = False  # the paper's adversarial consistency loss: not implemented in this version

    def __post_init__(self) -> None:
        if self.pcm_adversarial:
            raise ValueError(
                "distill.pcm_adversarial=true: not implemented in this version: the adversarial consistency loss "
                "needs a discriminator (heads on the frozen teacher UNet) with its own optimizer, trained on "
                "alternate steps; set distill.pcm_adversarial=false"
            )
        phase_edge_indices(self.num_ddim_timesteps, self.pcm_phases)  # raises on a bad pcm_phases

    def edges(self, solver_timesteps: Tensor) -> Tensor:
        """s_0..s_M of this split on the solver grid [N]; long [M + 1]."""
        return phase_edges(solver_timesteps, self.pcm_phases)


@dataclass
class PCMSample(LCDSample):
    """LCD's draws (t_start, noise, w) with the phase edge; t_prev is the clipped solver step."""

    edge: Tensor  # s_m [B], the lower edge of t_start's phase (student and target map there)


def draw_pcm_sample(latents: Tensor, s: PCMSettings, solver_timesteps: Tensor, generator: torch.Generator, *,
                    rank: int = 0, world_size: int = 1) -> PCMSample:
    """`lcd.draw_lcd_sample`'s draws (same order, same rows per rank), then s_m and t_prev = max(t - k, s_m)."""
    d = draw_lcd_sample(latents, s, solver_timesteps, generator, rank=rank, world_size=world_size)
    edge = lower_edge(d.t_start, s.edges(solver_timesteps))
    return PCMSample(d.t_start, clipped_solver_step(d.t_start, s.skip, edge), d.noise, d.w, edge)


def phased_consistency_target(unet: Any, z_prev: Tensor, d: PCMSample, cond: Conditioning, s: PCMSettings,
                              alpha_bar: Tensor) -> Tensor:
    """f^m_theta-(z_hat_{t_prev}, t_prev) mapped to s_m: the LoRA student under no_grad; [B, C, h, w]."""
    with torch.no_grad():
        out = unet(z_prev.to(cond.embeds.dtype), d.t_prev, **cond.unet_kwargs()).sample.float()
    x0 = predicted_x0(out, z_prev, d.t_prev, alpha_bar, s.prediction_type)
    eps = predicted_epsilon(out, z_prev, d.t_prev, alpha_bar, s.prediction_type)
    return phased_consistency_function(z_prev, x0, eps, d.t_prev, d.edge, alpha_bar)


def phased_student_prediction(unet: Any, z_start: Tensor, d: PCMSample, cond: Conditioning, s: PCMSettings,
                              alpha_bar: Tensor) -> Tensor:
    """f^m_theta(z_t, t) mapped to s_m, gradients into the LoRA; [B, C, h, w]."""
    out = unet(z_start.to(cond.embeds.dtype), d.t_start, **cond.unet_kwargs()).sample.float()
    x0 = predicted_x0(out, z_start, d.t_start, alpha_bar, s.prediction_type)
    eps = predicted_epsilon(out, z_start, d.t_start, alpha_bar, s.prediction_type)
    return phased_consistency_function(z_start, x0, eps, d.t_start, d.edge, alpha_bar)


def pcm_loss(student: Any, unet: Any, latents: Tensor, cond: Conditioning, uncond: Conditioning, s: PCMSettings,
             alpha_bar: Tensor, solver_timesteps: Tensor, generator: torch.Generator, *, rank: int = 0,
             world_size: int = 1) -> Tensor:
    """The phased consistency distillation loss for one batch of scaled latents [B, C, h, w]; scalar.

    Same inputs as `lcd.lcd_loss` (`student` possibly DDP-wrapped, `unet` unwrapped; `rank` and
    `world_size` pick this process's rows of the global batch's draws).
    """
    # Deliberately the shape of lcd.lcd_loss (the sibling objective: the same five steps, so the trainer
    # calls either); the phase edge enters in the draws, the target and the student.
    # 1. Draws: solver index, noise, w (as LCD); the phase edge s_m and t_prev = max(t - k, s_m).
    d = draw_pcm_sample(latents, s, solver_timesteps, generator, rank=rank, world_size=world_size)
    z_start = add_noise(latents, d.noise, d.t_start, alpha_bar)
    # 2. Teacher: LCD's guided DDIM step from t to t_prev, no gradients, adapters off.
    z_prev = teacher_solver_step(unet, z_start, d, cond, uncond, s, alpha_bar)
    # 3. Target: the LoRA UNet under no_grad at t_prev, mapped to s_m (z_prev itself where t_prev = s_m).
    target = phased_consistency_target(unet, z_prev, d, cond, s, alpha_bar)
    # 4. Student with gradients last, at t, mapped to the same s_m.
    pred = phased_student_prediction(student, z_start, d, cond, s, alpha_bar)
    # 5. The distance between the two points at s_m. The adversarial consistency loss (pcm_adversarial)
    # would be added here: pred and target re-noised from s_m to a timestep in [s_m, s_m + T / M)
    # and judged by a discriminator on the teacher's features (reference: train_pcm_lora_sd15_adv.py).
    return lcd_distance(pred, target, s.loss_type, s.huber_c)
