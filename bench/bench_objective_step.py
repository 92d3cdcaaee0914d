"""Distillation cost per step: phased consistency (PCM) against Algorithm 1 (LCD), side by side.

    python bench/bench_objective_step.py                       # the toy base, CPU, one thread
    python bench/bench_objective_step.py --base data/toy/base --batch 16 --steps 40 --phases 4

One process, the same UNet with the same LoRA, the same batch: steps of `lcd_loss` and of
`pcm_loss` (forward, backward, AdamW step) alternate, so machine load falls on both alike. Prints
the median step time of each, their ratio (issue 29's goal: PCM <= 1.1 x LCD) and the UNet calls
per step of each (counted by a forward pre-hook: the same work per step is the point).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components.cli.quiet import quiet_known_noise
from components.config import BaseConfig, DistillConfig
from components.distill.lcd import ddim_solver_timesteps, lcd_loss, schedule_from_scheduler_config
from components.distill.pcm import pcm_loss
from components.lora.adapter import add_lora, lora_config
from components.models.base_model import load_base
from components.models.conditioning import TextConditioner
from components.stages.distill import lcd_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(REPO / "data/toy/base"))
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each objective (after 3 warm-up pairs)")
    ap.add_argument("--phases", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quiet_known_noise()

    # 1. The base, its LoRA and a fixed batch (latents and prompts), as the trainer sees them.
    loaded = load_base(args.base)
    pipe, family = loaded.pipe, loaded.family
    base = BaseConfig(reference=args.base, family=family, resolution=args.resolution, guidance_scale=2.0)
    settings = {objective: lcd_settings(DistillConfig(objective=objective, pcm_phases=args.phases), "bench", base,
                                        family, dict(pipe.scheduler.config), pipe.vae.config.scaling_factor)
                for objective in ("lcm", "pcm")}
    add_lora(pipe.unet, lora_config(args.rank, args.rank, DistillConfig().target_modules))
    unet = pipe.unet.train()
    conditioner = TextConditioner.from_pipeline(pipe, family)
    h = args.resolution // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, unet.config.in_channels, h, h, generator=g)
    prompts = [f"a handwritten digit {i % 10}" for i in range(args.batch)]
    with torch.no_grad():
        cond = conditioner.conditioning({"captions": prompts})
        uncond = conditioner.unconditional(cond)
    alpha_bar = schedule_from_scheduler_config(dict(pipe.scheduler.config))
    solver = ddim_solver_timesteps(1000, 50)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-5)
    calls = {"n": 0}
    unet.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    losses = {"lcm": lcd_loss, "pcm": pcm_loss}

    def step(objective: str, seed: int) -> tuple[float, int]:
        calls["n"] = 0
        t0 = time.perf_counter()
        loss = losses[objective](unet, unet, latents, cond, uncond, settings[objective], alpha_bar, solver,
                                 torch.Generator().manual_seed(seed))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, calls["n"]

    # 2. Alternate the two objectives' steps; the first pairs warm up.
    times: dict[str, list[float]] = {"lcm": [], "pcm": []}
    unet_calls: dict[str, set[int]] = {"lcm": set(), "pcm": set()}
    for i in range(args.steps + 3):
        for objective in (("lcm", "pcm") if i % 2 == 0 else ("pcm", "lcm")):
            seconds, n = step(objective, i)
            unet_calls[objective].add(n)
            if i >= 3:
                times[objective].append(seconds)
    lcm, pcm = statistics.median(times["lcm"]), statistics.median(times["pcm"])
    print(f"base {args.base} ({family}, {args.resolution} px), batch {args.batch}, LoRA rank {args.rank}, "
          f"{args.threads} thread(s), {args.steps} steps each, interleaved")
    print(f"LCD step median {lcm * 1000:.1f} ms, UNet calls per step {sorted(unet_calls['lcm'])}")
    print(f"PCM step median {pcm * 1000:.1f} ms ({args.phases} phases), UNet calls per step {sorted(unet_calls['pcm'])}")
    print(f"PCM / LCD step time: {pcm / lcm:.3f} (goal <= 1.1)")


if __name__ == "__main__":
    main()
