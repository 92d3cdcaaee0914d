"""Optional speed-ups of the distillation loop (DistillConfig flags; all off by default).

The plain path (`components.distill.lcd.lcd_loss`, torch AdamW, batches read in the loop) stays the
reference: each function here is used by `components.distill.trainer` only when its flag is set.
docs/distill.md ("Speed-ups") lists the measured gains and the numeric bounds of each.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from components.distill.lcd import (
    LCDSettings,
    add_noise,
    consistency_target,
    draw_lcd_sample,
    lcd_distance,
    student_prediction,
    teacher_solver_step,
)
from components.models.conditioning import Conditioning
from components.storage.read_ahead import read_ahead

OPTIMIZERS = ("adamw", "adamw_fused", "adamw_8bit")


def make_optimizer(name: str, params: list[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW over `params`: torch's default (foreach), fused, or bitsandbytes' 8-bit AdamW."""
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adamw_fused":
        return torch.optim.AdamW(params, fused=True, **kwargs)
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError(
                "distill.optimizer=adamw_8bit needs bitsandbytes (a CUDA build): `pip install bitsandbytes` on "
                "the GPU machine, or set distill.optimizer to adamw or adamw_fused"
            ) from exc
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise ValueError(f"distill.optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def prefetched(batches: Iterator[dict], depth: int, *, pin: bool) -> Iterator[dict]:
    """The same batches in the same order, read `depth` ahead by a daemon thread; tensors pinned if `pin`."""
    if pin:
        batches = ({k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in b.items()} for b in batches)
    return read_ahead(batches, depth, "lcd-prefetch")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch on `device` without a host sync (non_blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def lcd_loss_bf16_teacher(student: Any, unet: Any, latents: Tensor, cond: Conditioning, uncond: Conditioning,
                          s: LCDSettings, alpha_bar: Tensor, solver_timesteps: Tensor,
                          generator: torch.Generator, *, rank: int = 0, world_size: int = 1) -> Tensor:
    """`lcd.lcd_loss` (Algorithm 1, lines 3-6) with the no-grad teacher and target passes under bf16 autocast.

    Same draws in the same order; the student pass and the loss keep the caller's precision.
    """
    d = draw_lcd_sample(latents, s, solver_timesteps, generator, rank=rank, world_size=world_size)
    z_start = add_noise(latents, d.noise, d.t_start, alpha_bar)
    with torch.autocast(latents.device.type, dtype=torch.bfloat16):
        z_prev = teacher_solver_step(unet, z_start, d, cond, uncond, s, alpha_bar)
        target = consistency_target(unet, z_prev, d, cond, s, alpha_bar)
    pred = student_prediction(student, z_start, d, cond, s, alpha_bar)
    return lcd_distance(pred, target.float(), s.loss_type, s.huber_c)
