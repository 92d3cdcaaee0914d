"""`lcmlora toy style-lora --hard [--sdxl]`: the hard style LoRA, trained with the easy toy's trainer
(`components/toy/style_lora.py:train_style_lora`, plain DDPM LoRA fine-tuning) on the hard
style set, on the SD-1.5-family hard base (toy.hard.base_dir) or, with --sdxl, the SDXL-family one
(toy.hard.sdxl_dir; its folder: toy.hard.style_output with `-sdxl` appended).

Its folder has the easy style LoRA's layout: both LoRA formats (alpha kept), `losses.csv`,
`metrics.json` (hard style strength and adherence of 25-step DPM-Solver++ samples with and
without the LoRA, at the hard base's guidance) and the resolved params.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.config import RESOLVED_CONFIG_NAME, EvaluateConfig, Params
from components.progress import ProgressFn


def style_lora_folder(hard, family: str = "sd15") -> str:
    """Where the hard style LoRA of `family` is kept by default: toy.hard.style_output (SDXL: `-sdxl` appended)."""
    return hard.style_output if family == "sd15" else f"{hard.style_output}-sdxl"


def run_hard_style_lora(params: Params, output: str | Path | None = None,
                        progress: ProgressFn | None = None, family: str = "sd15") -> dict[str, Any]:
    """Train the hard style LoRA on the `family` hard base (toy.hard.base_dir, or sdxl_dir) from the style set
    in toy.hard.style_dir (written first if missing) and write its folder (`style_lora_folder` unless
    `output`); returns the metrics."""
    from components.models.base_model import load_base
    from components.paths import project_path
    from components.toy.hard.config import FAMILIES, hard_toy_config
    from components.toy.hard.render import HARD_SIZE
    from components.toy.hard.style import (
        DEFAULT_STYLE,
        hard_style,
        read_hard_style,
        write_hard_style,
    )
    from components.toy.style_lora import StyleTraining, save_style_lora, train_style_lora

    hard = hard_toy_config(params)
    out = Path(output or style_lora_folder(hard, family))
    key, where = ("base_dir", hard.base_dir) if family == "sd15" else ("sdxl_dir", hard.sdxl_dir)
    reference = project_path(where)
    if not (reference / "model_index.json").is_file():
        raise FileNotFoundError(f"toy.hard.{key}={where}: no hard base there; build it with `lcmlora toy base "
                                f"--hard{' --sdxl' if family == 'sdxl' else ''}` or point toy.hard.{key} at one")
    style_dir = project_path(hard.style_dir)
    if not (style_dir / "metadata.jsonl").is_file():
        write_hard_style(style_dir, hard.style_count, hard.style_seed, hard.layout, hard.style)
    loaded = load_base(str(reference), family=family)
    pipe = loaded.pipe
    # 1. Training on the style set (plain captions).
    t0 = time.perf_counter()
    images, captions = read_hard_style(style_dir, hard.layout, hard.style_count, hard.style_seed, hard.style)
    training = StyleTraining(rank=hard.style_rank, alpha=hard.style_alpha, steps=hard.style_steps,
                             batch_size=hard.style_batch_size, lr=hard.style_lr, seed=hard.style_seed)
    losses = train_style_lora(pipe, images, captions, training, progress=progress)
    train_seconds = time.perf_counter() - t0
    # 2. Both formats, alpha kept.
    base_name = FAMILIES[family]
    base_meta = {"name": base_name, "family": family, "resolution": HARD_SIZE, "reference": str(reference),
                 "fingerprint": loaded.fingerprint}
    look = hard_style(hard.style)
    name = f"{base_name}-style-lora" if hard.style == DEFAULT_STYLE else f"{base_name}-{look.name}-style-lora"
    paths = save_style_lora(pipe, out, losses, base_meta, name,
                            f"hard toy style LoRA ({look.description}), plain diffusion LoRA fine-tuning", family)
    # 3. Style strength and adherence with and without the LoRA.
    scores = score_hard_style_lora(pipe, hard.style_eval_images, hard.guidance_scale, hard.style)
    metrics = {
        "train_seconds": round(train_seconds, 1), "first_loss_mean_first50": float(np.mean(losses[:50])),
        "final_loss_mean_last50": float(np.mean(losses[-50:])),
        **scores, "style": hard.style, "family": family, "rank": hard.style_rank, "alpha": hard.style_alpha,
        "base": str(reference), "files": {k: str(v) for k, v in paths.items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / RESOLVED_CONFIG_NAME).write_text(params.to_yaml())
    return metrics


def score_hard_style_lora(pipe: Any, images: int, guidance_scale: float, style: str | None = None) -> dict[str, float]:
    """Strength of hard style `style` (None: the default style) and adherence of `images` samples (the hard
    prompts in turn, seeds 0..) with the pipe's style LoRA and without it: 25 DPM-Solver++ steps at
    `guidance_scale` (the hard base's)."""
    from components.evaluate.evaluation import load_prompts
    from components.toy.hard.plugins import HARD_PROMPTS, hard_judges
    from components.toy.hard.render import HARD_SIZE
    from components.toy.style_lora import sample_with_and_without

    judges = hard_judges(EvaluateConfig(style=style), HARD_SIZE)
    hard_prompts = load_prompts(HARD_PROMPTS)
    prompts = [hard_prompts[i % len(hard_prompts)] for i in range(images)]
    with_lora, without = sample_with_and_without(pipe, prompts, guidance_scale, HARD_SIZE)
    return {
        "style_strength_with_lora_dpmpp25": judges.style.mean_strength(with_lora),
        "style_strength_base_dpmpp25": judges.style.mean_strength(without),
        "adherence_with_lora_dpmpp25": judges.adherence(with_lora, prompts),
        "adherence_base_dpmpp25": judges.adherence(without, prompts),
        "style_metric_separation": judges.style.metric.separation,
    }


def rescore_hard_style_lora(params: Params, folder: str | Path | None = None) -> dict[str, Any]:
    """`lcmlora toy style-lora --hard --rescore`: score the style LoRA already in `folder` (default
    toy.hard.style_output) on the hard base as it is now (toy.hard.base_dir, e.g. after a decoder
    fine-tune) without training it again; its metrics.json gets the new scores, the base's
    fingerprint and `scored_at` (training figures kept). Returns the metrics."""
    from datetime import UTC, datetime

    from components.lora import io as lora_io
    from components.models.base_model import load_base
    from components.paths import project_path
    from components.toy.hard.config import hard_toy_config
    from components.toy.style_lora import STYLE_ADAPTER

    hard = hard_toy_config(params)
    out = project_path(folder or hard.style_output)
    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{out}: no style LoRA folder (metrics.json); train one with "
                                "`lcmlora toy style-lora --hard`")
    metrics = json.loads(metrics_file.read_text())
    family = metrics.get("family", "sd15")
    reference = project_path(hard.base_dir if family == "sd15" else hard.sdxl_dir)
    loaded = load_base(str(reference), family=family)
    lora_io.load_adapter(loaded.pipe, family, lora_io.lora_file(out), STYLE_ADAPTER)
    metrics.update(score_hard_style_lora(loaded.pipe, hard.style_eval_images, hard.guidance_scale,
                                         metrics.get("style")))
    metrics.update({"base": str(reference), "scored_base_fingerprint": loaded.fingerprint,
                    "scored_at": datetime.now(UTC).isoformat(timespec="seconds")})
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
