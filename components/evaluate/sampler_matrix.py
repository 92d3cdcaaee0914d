"""The sampler matrix: the LCM-LoRA against its own teacher, from the same initial noise.

Rows (methods):
- `lcm-N`: the LCM-LoRA with LCMScheduler at N steps (guidance 1.0 by default: one UNet pass
  per step; up to 2.0 with classifier-free guidance, as the report recommends);
- `pcm-N`: a PCM-LoRA (phased consistency) instead, with TCDScheduler at gamma 0: deterministic
  jumps to the phase edges (`components/lora/objective.py`); its gate reads these rows;
- `lcm-N-cfgG` / `pcm-N-cfgG`: optionally the student with classifier-free guidance G and the
  negative prompts (`evaluate.cfg_scales`, `evaluate.negative_prompts`), where LCM is known to break;
- `tcd-N`: optionally the same LoRA with TCDScheduler and its gamma;
- `lcm_base-N`: optionally LCMScheduler on the teacher alone (no LoRA): what the sampler does
  without distillation, so the LoRA's own contribution can be read off;
- `ddim-N`, `dpmpp-N`: the teacher alone (adapters disabled, the same weights in memory) with
  DDIM and DPM-Solver++ (2M) at the LCM step counts and at 25 and 50 steps, with CFG at the
  base's own guidance scale.

Image i of every method starts from the same latent noise (seed `seeds[i]`) and, where the
sampler injects noise between steps (LCM, TCD), draws it from its own generator seeded the same
way, so rows differ only by the method.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from components.lora.formats import LORA_WEIGHT_NAME

Sampler = Literal["lcm", "pcm", "tcd", "lcm_base", "ddim", "dpmpp"]
Student = Literal["lcm", "pcm"]  # the objective the LoRA was distilled with: the sampler of its own rows
LORA_ADAPTER = "lcm"


@dataclass(frozen=True)
class Method:
    sampler: Sampler
    steps: int
    guidance_scale: float
    lora: bool  # True: the LCM-LoRA is active; False: the teacher alone
    gamma: float | None = None  # TCD's gamma (passed to the scheduler as eta)
    timesteps: tuple[int, ...] | None = None  # explicit timesteps (PCM's phase edges) instead of the scheduler's pick
    negative: bool = False  # with the negative prompts (a CFG row)
    suffix: str = ""  # label suffix of a CFG row, e.g. "-cfg3"

    @property
    def label(self) -> str:
        return f"{self.sampler}-{self.steps}{self.suffix}"


@dataclass
class MethodRun:
    method: Method
    images: torch.Tensor  # N x 3 x H x W, float32 in [-1, 1], CPU
    unet_evals_per_image: float  # UNet rows processed per image (a CFG step counts 2)
    seconds_per_image: float  # wall time of the pipeline calls per image


def build_matrix(steps: list[int], teacher_steps: list[int], teacher_samplers: list[str],
                 teacher_guidance: float, lcm_guidance: float = 1.0, tcd_gamma: float | None = None,
                 lcm_without_lora: bool = False, student: Student = "lcm", cfg_scales: list[float] | None = None,
                 cfg_steps: list[int] | None = None,
                 student_timesteps: Callable[[int], tuple[int, ...]] | None = None) -> list[Method]:
    """The methods in report order: the student's rows (LCM, or PCM at gamma 0), its CFG rows, TCD
    rows, LCM-without-LoRA rows, then each teacher sampler over all its step counts."""
    if not steps or any(s < 1 for s in steps):
        raise ValueError(f"evaluate.steps must be positive step counts, got {steps}")
    gamma = 0.0 if student == "pcm" else None  # PCM: deterministic jumps to the phase edges

    def edges(s: int) -> tuple[int, ...] | None:
        return student_timesteps(s) if student_timesteps is not None else None

    methods = [Method(student, s, lcm_guidance, True, gamma, edges(s)) for s in steps]
    for scale in cfg_scales or []:
        methods += [Method(student, s, float(scale), True, gamma, edges(s), negative=True, suffix=f"-cfg{scale:g}")
                    for s in (cfg_steps or [4])]
    if tcd_gamma is not None:
        methods += [Method("tcd", s, lcm_guidance, True, tcd_gamma) for s in steps]
    if lcm_without_lora:
        methods += [Method("lcm_base", s, lcm_guidance, False) for s in steps]
    all_teacher_steps = sorted(set(steps) | set(teacher_steps))
    for sampler in teacher_samplers:
        methods += [Method(sampler, s, teacher_guidance, False) for s in all_teacher_steps]  # type: ignore[arg-type]
    return methods


def make_scheduler(method: Method, base_config: Any, timestep_spacing: str | None = None):
    """A fresh scheduler for `method` built from the base's scheduler config."""
    from diffusers.utils import logging as diffusers_logging

    # Keys of the base's scheduler that the new class does not use are expected; keep them off the log.
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return _make_scheduler(method, base_config, timestep_spacing)
    finally:
        diffusers_logging.set_verbosity(level)


def _make_scheduler(method: Method, base_config: Any, timestep_spacing: str | None):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, TCDScheduler

    if method.sampler in ("lcm", "lcm_base"):
        return LCMScheduler.from_config(base_config)
    if method.sampler in ("tcd", "pcm"):
        return TCDScheduler.from_config(base_config)
    spacing = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
    if method.sampler == "ddim":
        return DDIMScheduler.from_config(base_config, **spacing)
    if method.sampler == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++", solver_order=2,
                                                       **spacing)
    raise ValueError(f"unknown sampler {method.sampler!r}; expected lcm, pcm, tcd, lcm_base, ddim or dpmpp")


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Latent noise N x C x h x w; row i depends only on seeds[i] (float32, CPU)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def latent_shape(pipe: Any, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of the pipeline's latents at an image size."""
    factor = pipe.vae_scale_factor
    if height % factor or width % factor:
        raise ValueError(f"image size {height}x{width} is not a multiple of the VAE factor {factor}")
    return pipe.unet.config.in_channels, height // factor, width // factor


class UNetCallCounter:
    """Counts the batch rows the UNet processes (a forward pre-hook), for the cost column."""

    def __init__(self, unet: torch.nn.Module):
        self.rows = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows += int(sample.shape[0])

    def close(self) -> None:
        self._handle.remove()


@contextmanager
def lora_loaded(pipe: Any, folder: str | Path) -> Iterator[None]:
    """Load the LoRA artifact folder into `pipe` as adapter "lcm"; unload it on exit."""
    folder = Path(folder)
    weights = folder / LORA_WEIGHT_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no {LORA_WEIGHT_NAME}; --lora must be a LoRA artifact folder "
                                "written by `lcmlora distill` (DESIGN contract 4)")
    pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME, adapter_name=LORA_ADAPTER)
    try:
        yield
    finally:
        pipe.unload_lora_weights()


def run_method(pipe: Any, method: Method, prompts: list[str], noise: torch.Tensor, seeds: list[int], *,
               height: int, width: int, batch_size: int, timestep_spacing: str | None = None,
               base_scheduler_config: Any = None, negative_prompts: list[str] | None = None) -> MethodRun:
    """Sample one method over all prompts (one per noise row); the LoRA must already be in the state
    wanted. The method's scheduler is built from the pipeline's own and the pipeline's is put back.
    `negative_prompts` (one per row) go to the methods that ask for them (CFG rows)."""
    if len(prompts) != noise.shape[0] or len(seeds) != noise.shape[0]:
        raise ValueError(f"run_method: {len(prompts)} prompts, {len(seeds)} seeds, {noise.shape[0]} noise rows")
    if method.negative and (negative_prompts is None or len(negative_prompts) != len(prompts)):
        raise ValueError(f"{method.label}: a CFG row needs one negative prompt per image "
                         f"(got {0 if negative_prompts is None else len(negative_prompts)} for {len(prompts)})")
    base_scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(method, base_scheduler_config or base_scheduler.config, timestep_spacing)
    device = pipe.unet.device
    extra = {"eta": method.gamma} if method.gamma is not None else {}
    counter = UNetCallCounter(pipe.unet)
    images, seconds = [], 0.0
    try:
        for start in range(0, len(prompts), batch_size):
            stop = min(start + batch_size, len(prompts))
            # CPU generators on every device: the injected noise (LCM, TCD) is the same on CPU and GPU.
            generators = [torch.Generator().manual_seed(int(s) + 1_000_003) for s in seeds[start:stop]]
            t0 = time.perf_counter()
            negative = {"negative_prompt": negative_prompts[start:stop]} if method.negative else {}
            steps = {"timesteps": list(method.timesteps)} if method.timesteps else {"num_inference_steps": method.steps}
            out = pipe(prompt=prompts[start:stop], **steps, **negative,
                       guidance_scale=method.guidance_scale, latents=noise[start:stop].to(device, pipe.unet.dtype),
                       generator=generators, height=height, width=width, output_type="pt", **extra)
            images.append(out.images.float().cpu() * 2.0 - 1.0)  # the copy to CPU also waits for a GPU
            seconds += time.perf_counter() - t0
    finally:
        counter.close()
        pipe.scheduler = base_scheduler
    n = len(prompts)
    return MethodRun(method, torch.cat(images).clamp(-1.0, 1.0), counter.rows / n, seconds / n)


def run_matrix(pipe: Any, lora_folder: str | Path, methods: list[Method], prompts: list[str], seeds: list[int], *,
               height: int, width: int, batch_size: int = 50, timestep_spacing: str | None = None,
               callback: Callable[[MethodRun], None] | None = None,
               negative_prompts: list[str] | None = None) -> list[MethodRun]:
    """Every method over the same prompts and noise. The LoRA is loaded once and toggled per method
    (teacher rows run with adapters disabled), then unloaded."""
    # 1. One noise tensor for every method.
    noise = initial_noise(seeds, latent_shape(pipe, height, width))
    pipe.set_progress_bar_config(disable=True)
    runs = []
    with lora_loaded(pipe, lora_folder):
        for method in methods:
            # 2. The teacher is the same weights with the adapters switched off.
            if method.lora:
                pipe.enable_lora()
            else:
                pipe.disable_lora()
            run = run_method(pipe, method, prompts, noise, seeds, height=height, width=width,
                             batch_size=batch_size, timestep_spacing=timestep_spacing,
                             negative_prompts=negative_prompts)
            runs.append(run)
            if callback is not None:
                callback(run)
    return runs
