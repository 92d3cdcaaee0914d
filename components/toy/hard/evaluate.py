"""The hard base's difficulty table: adherence and FD of the teacher at 50 and 4 steps.

Prompts are random scenes of held-out digit images; the reference set for FD is real renders
of scenes drawn the same way. Samplers are DDIM and DPM-Solver++ (2M) on the saved
StableDiffusionPipeline at the base's own guidance. The difficulty rule of issue 12:
best-of-two teacher-50 adherence >= 0.8, and teacher-4 clearly worse: adherence <= 0.85 x
teacher-50's or FD >= 2 x teacher-50's FD.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from components.evaluate.frechet import frechet_distance_of_features
from components.evaluate.sampler_matrix import Method, make_scheduler
from components.progress import Progress, ProgressFn
from components.toy.classifier import digit_split, load_sklearn_digits
from components.toy.hard.base import (
    assemble_hard_pipeline,
    encode_latents,
    hard_tokenizer,
    hard_vae,
    load_ema,
    unit_variance_scale,
)
from components.toy.hard.config import HardToyConfig
from components.toy.hard.data import SceneSet, render_scenes
from components.toy.hard.judges import HardJudges, adherence, load_judges, swapped_sides
from components.toy.hard.style_metric import style_through_vae

SAMPLERS = {"ddim": "ddim", "dpm++": "dpmpp"}  # table label -> sampler of components/evaluate/sampler_matrix.py


def prompt_set(n: int, seed: int, layout: str = "narrow") -> SceneSet:
    """`n` held-out scenes (digits outside the judges' training split), rendered with jitter in `layout`."""
    images8, labels = load_sklearn_digits()
    _, test_idx = digit_split(labels, 0)
    return render_scenes(images8, labels, n, np.random.default_rng(seed), test_idx, layout=layout)


@torch.no_grad()
def sample(pipe: StableDiffusionPipeline, sampler: str, steps: int, captions: list[str], guidance: float,
           seed: int, batch_size: int = 100, timestep_spacing: str | None = None,
           scheduler_config: dict | None = None) -> torch.Tensor:
    """N x 3 x 64 x 64 images in [-1, 1] from the pipeline with `sampler` at `steps` steps, from
    `scheduler_config` (default: the pipe's scheduler's), at `timestep_spacing` when given."""
    pipe.scheduler = make_scheduler(Method(SAMPLERS.get(sampler, sampler), steps, guidance, False),
                                    scheduler_config or pipe.scheduler.config, timestep_spacing)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(captions), batch_size):
        images = pipe(captions[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                      generator=generator, output_type="pt").images
        out.append((images * 2.0 - 1.0).cpu())  # the judges read on the CPU
    return torch.cat(out)


def _rule(table: dict[str, dict[str, float]], suffixes: tuple[str, ...]) -> dict[str, float | bool | str]:
    """The rule over the rows `{sampler}-{steps}{suffix}` for every sampler and suffix."""
    def rows(steps: int) -> list[str]:
        return [f"{s}-{steps}{x}" for x in suffixes for s in SAMPLERS if f"{s}-{steps}{x}" in table]

    def best(steps: int) -> str:
        return max(rows(steps), key=lambda k: (table[k]["adherence"], -table[k]["fd"]))

    best50, best4 = best(50), best(4)
    a50, fd50 = table[best50]["adherence"], table[best50]["fd"]
    a4 = table[best4]["adherence"]
    fd4 = min(table[k]["fd"] for k in rows(4))
    return {"teacher50": best50, "teacher50_adherence": a50, "teacher50_fd": fd50, "teacher4": best4,
            "teacher4_adherence": a4, "teacher4_best_fd": fd4,
            "base_good": a50 >= 0.8, "four_steps_worse": a4 <= 0.85 * a50 or fd4 >= 2.0 * fd50}


def difficulty_rule(table: dict[str, dict[str, float]]) -> dict:
    """Issue 12's rule from `table[f"{sampler}-{steps}"] = {"adherence", "fd"}` (the base's own timestep
    spacing). With rows `{sampler}-{steps}-trailing` too, `best_of_spacings` holds the rule over both
    spacings: the teacher's best at 4 and at 50 steps, whichever spacing gives it."""
    rule: dict = _rule(table, ("",))
    if any(k.endswith("-trailing") for k in table):
        rule["best_of_spacings"] = _rule(table, ("", "-trailing"))
    return rule


def difficulty_table(pipe: StableDiffusionPipeline, judges: HardJudges, n: int, guidance: float, seed: int = 0,
                     steps: tuple[int, ...] = (50, 4), progress: ProgressFn | None = None,
                     spacings: tuple[str | None, ...] = (None, "trailing")) -> dict:
    """Adherence, sides swapped (`judges.swapped_sides`) and FD (judges' features, vs real renders)
    for each sampler, step count and timestep spacing (None: the base's own, rows `SAMPLER-STEPS`;
    else rows `SAMPLER-STEPS-SPACING`: the evaluate stage samples the teacher at `trailing`)."""
    prompts, reference = prompt_set(n, seed + 500, judges.layout), prompt_set(n, seed + 600, judges.layout)
    ref_features = judges.features(reference.images)
    base_config = dict(pipe.scheduler.config)
    table: dict[str, dict[str, float]] = {}
    runs = [(s, k, x) for x in spacings for k in steps for s in SAMPLERS]
    for i, (sampler, k, spacing) in enumerate(runs):
        label = f"{sampler}-{k}" + (f"-{spacing}" if spacing else "")
        images = sample(pipe, sampler, k, prompts.captions, guidance, seed, timestep_spacing=spacing,
                        scheduler_config=base_config)
        table[label] = {"adherence": adherence(judges, images, prompts.parts),
                        "swapped": swapped_sides(judges, images, prompts.parts),
                        "fd": frechet_distance_of_features(judges.features(images), ref_features)}
        if progress is not None:
            progress(Progress("hard-evaluate", i + 1, len(runs), table[label], label))
    return {"guidance_scale": guidance, "samples": n, "own_timestep_spacing": base_config.get("timestep_spacing"),
            "table": table, "real_renders_adherence": adherence(judges, prompts.images, prompts.parts),
            **(difficulty_rule(table) if set(steps) >= {50, 4} else {})}


def checkpoint_vae(s: HardToyConfig, scenes: int = 500) -> AutoencoderKL:
    """The VAE of `checkpoint_dir/vae.pt`, its scaling factor estimated on `scenes` training-like renders."""
    vae = hard_vae(s.seed)
    vae.load_state_dict(torch.load(Path(s.checkpoint_dir) / "vae.pt")["vae"])
    vae.eval().requires_grad_(False)
    images8, labels = load_sklearn_digits()
    renders = render_scenes(images8, labels, scenes, np.random.default_rng(s.seed + 7), layout=s.layout)
    vae.register_to_config(scaling_factor=unit_variance_scale(encode_latents(vae, renders.images)))
    return vae


def evaluate_base(s: HardToyConfig, checkpoint: str | None = None, progress: ProgressFn | None = None,
                  sdxl: bool = False) -> dict:
    """The difficulty table of `base_dir` (`sdxl_dir` with `sdxl`), or of an SD-1.5-family EMA
    checkpoint (VAE from base_dir, else from checkpoint_dir)."""
    if sdxl:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(s.sdxl_dir)
    elif checkpoint is None:
        pipe = StableDiffusionPipeline.from_pretrained(s.base_dir, safety_checker=None, requires_safety_checker=False)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = hard_tokenizer(tmp)
        unet, text_encoder = load_ema(checkpoint, tokenizer, s)
        if Path(s.base_dir, "vae").exists():
            vae = AutoencoderKL.from_pretrained(s.base_dir, subfolder="vae")
        else:
            vae = checkpoint_vae(s)
        pipe = assemble_hard_pipeline(vae, unet, text_encoder, tokenizer)
    pipe.to(s.device)
    judges = load_judges(s.judges_dir)
    if judges.layout != s.layout:
        raise ValueError(f"{s.judges_dir}: judges trained on the {judges.layout} layout, toy.hard.layout is "
                         f"{s.layout}; build judges for it (`python -m components.toy.hard judges`)")
    report = difficulty_table(pipe, judges, s.final_samples, s.guidance_scale, s.seed, progress=progress)
    report["model"] = str(Path(s.sdxl_dir) if sdxl else checkpoint or Path(s.base_dir))
    report["style_strength"] = style_through_vae(pipe.vae, layout=s.layout)  # the ceiling any sampler on this base has
    return report
