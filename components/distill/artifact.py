"""The LoRA artifact folder of a distillation run (DESIGN contract 4).

    pytorch_lora_weights.safetensors   diffusers/peft keys + LoraConfig metadata (alpha kept)
    lora_kohya.safetensors             kohya keys, per-module alpha, ss_* / modelspec.* metadata
    README.md                          model card (base_model, library_name, tags, recommended)
    metrics.json                       {"distill": {...}}; evaluation adds "gate" later
    lineage.json                       base fingerprints, shard index hash, git/DVC, params, hardware, times
    config.yaml                        the resolved params
    loss_curve.csv, loss_curve.png     the LCD loss per step

The folder is complete or absent: it is written into a hidden sibling and renamed into place
(`components/storage/atomic_dir.py`); a rerun replaces the previous run's folder whole (its evaluation
and gate describe other weights), keeping only `checkpoints/`. `check_distill_output` runs
before training: the folder can be written and replaced, and its filesystem has room.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from components.distill.output_checks import check_output_folder, distill_artifact_bytes
from components.distill.trainer import CHECKPOINT_DIR
from components.lineage import portable_yaml, write_lineage
from components.lora import formats as lora_formats
from components.lora.model_card import DEFAULT_TAGS, PCM_TAGS, render_model_card
from components.lora.objective import SamplingRecipe, objective_metadata
from components.lora.objective import recipe as objective_recipe
from components.storage.atomic_dir import atomic_dir, check_replaceable

RECOMMENDED_STEPS = 4  # the report's 4-step sampling (an LCM-LoRA; a PCM-LoRA: its phases)
RECOMMENDED_GUIDANCE = 1.0  # guidance is distilled in; LCM sampling uses little or no CFG
# What a previous run may have left in the folder (evaluation adds `evaluation/` and metrics);
# a folder holding anything else is never replaced.
OWNS = ("*.safetensors", "*.md", "*.json", "*.yaml", "*.csv", "*.png", CHECKPOINT_DIR, "evaluation")


def check_distill_output(folder: str | Path, *, lora_params: int, checkpoints: int) -> None:
    """Before training: `folder` can be written and replaced, and has room for the artifact
    (`lora_params` fp32 in two files, `checkpoints` kept checkpoints). Raises naming the folder."""
    folder = Path(folder)
    check_replaceable(folder.absolute(), OWNS)
    check_output_folder(folder, distill_artifact_bytes(lora_params=lora_params, checkpoints=checkpoints))


def write_loss_curve(folder: Path, rows: list[dict[str, float]]) -> tuple[Path, Path]:
    """loss_curve.csv (step, loss, loss_mean20) and loss_curve.png (matplotlib, headless)."""
    csv_path, png_path = folder / "loss_curve.csv", folder / "loss_curve.png"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "loss_mean20"])
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], lw=0.6, alpha=0.5, label="loss")
    ax.plot(steps, [r["loss_mean20"] for r in rows], lw=1.5, label="mean of 20")
    ax.set_xlabel("step")
    ax.set_ylabel("LCD loss")
    if rows and min(r["loss"] for r in rows) > 0:
        ax.set_yscale("log")
    ax.legend()
    ax.set_title("Latent consistency distillation")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return csv_path, png_path


def distill_metrics(history: list[tuple[int, float]], *, steps: int, seconds: float, samples_per_second: float,
                    lora_params: int) -> dict[str, Any]:
    """metrics.json's `distill` section: final and smoothed losses, throughput, size."""
    losses = [loss for _, loss in history]
    tail = losses[-20:] or [float("nan")]
    head = losses[:20] or [float("nan")]
    return {
        "steps": steps,
        "final_loss": losses[-1] if losses else None,
        "final_loss_mean20": sum(tail) / len(tail),
        "first_loss_mean20": sum(head) / len(head),
        "seconds": round(seconds, 2),
        "samples_per_second": round(samples_per_second, 3),
        "lora_trainable_params": lora_params,
    }


def write_distill_artifact(
    folder: str | Path,
    *,
    lora_state_dict: dict,
    rank: int,
    alpha: float,
    base_meta: dict[str, Any],
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    config_yaml: str,
    loss_rows: list[dict[str, float]],
    recipe: SamplingRecipe | None = None,
) -> dict[str, Path]:
    """Write every file of the contract-4 folder; returns their paths by role (in `folder`).

    `recipe`: the objective the LoRA was distilled with and how it samples (None: LCM); its files'
    metadata, card and title name it.

    The folder is staged and renamed into place; a previous run's folder is replaced whole,
    its `checkpoints/` kept (the caller removes them when the run is finished).
    """
    folder = Path(folder)
    with atomic_dir(folder, owns=OWNS, carry=(CHECKPOINT_DIR,)) as staging:
        written = _write_files(staging, lora_state_dict=lora_state_dict, rank=rank, alpha=alpha,
                               base_meta=base_meta, metrics=metrics, lineage=lineage, config_yaml=config_yaml,
                               loss_rows=loss_rows, recipe=recipe or objective_recipe())
    return {role: folder / path.relative_to(staging) for role, path in written.items()}


def _write_files(folder: Path, *, lora_state_dict: dict, rank: int, alpha: float, base_meta: dict[str, Any],
                 metrics: dict[str, Any], lineage: dict[str, Any], config_yaml: str,
                 loss_rows: list[dict[str, float]], recipe: SamplingRecipe) -> dict[str, Path]:
    title = f"{base_meta.get('name', 'base')}-{recipe.tag}-lora"
    kohya_extra = {"ss_steps": str(metrics.get("steps", ""))}
    if recipe.objective == "pcm":  # the kohya defaults describe an LCM-LoRA
        kohya_extra |= {"ss_training_comment": f"PCM-LoRA by phased consistency distillation (arXiv 2405.18407), "
                        f"{recipe.phases} phases; recommended: {recipe.scheduler} eta {recipe.eta}, "
                        f"{recipe.steps} steps, guidance 1.0",
                        "modelspec.description": f"PCM-LoRA acceleration vector for {base_meta.get('name', 'the base')} "
                        f"({base_meta.get('family')})"}
    paths = lora_formats.save_lora(folder, lora_state_dict, rank=rank, alpha=alpha, base_meta=base_meta, title=title,
                                   extra_metadata=kohya_extra, shared_metadata=objective_metadata(recipe))
    method = ("Latent Consistency Distillation" if recipe.objective == "lcm" else
              f"Phased Consistency Distillation ({recipe.phases} phases)")
    body = (
        "\n## Training\n\n"
        f"{method} with LoRA (rank {rank}, alpha {alpha:g}) on `{base_meta.get('reference')}` "
        f"({base_meta.get('family')}), {metrics.get('steps')} steps, final LCD loss "
        f"{metrics.get('final_loss_mean20', float('nan')):.5f} (mean of the last 20 steps).\n\n"
        f"Files: `{lora_formats.LORA_WEIGHT_NAME}` (diffusers/peft), `{lora_formats.KOHYA_WEIGHT_NAME}` "
        "(kohya, for ComfyUI/A1111), `metrics.json`, `lineage.json`, `config.yaml`, `loss_curve.csv/png`.\n"
    )
    card = render_model_card(base_model=str(base_meta.get("reference")), title=title, hub_id=base_meta.get("hub_id"),
                             license=base_meta.get("license"),
                             num_inference_steps=recipe.steps, guidance_scale=RECOMMENDED_GUIDANCE, body=body,
                             tags=DEFAULT_TAGS if recipe.objective == "lcm" else PCM_TAGS, recipe=recipe,
                             extra={"lcm_lora": {"rank": rank, "alpha": alpha, "family": base_meta.get("family"),
                                                 "base_fingerprint": base_meta.get("fingerprint")}})
    paths["model_card"] = folder / "README.md"
    paths["model_card"].write_text(card)
    paths["metrics"] = folder / "metrics.json"
    paths["metrics"].write_text(json.dumps({"distill": metrics}, indent=2, sort_keys=True) + "\n")
    paths["lineage"] = folder / "lineage.json"
    write_lineage(folder, lineage)  # absolute local paths made portable, as in config.yaml
    paths["config"] = folder / "config.yaml"
    paths["config"].write_text(portable_yaml(config_yaml))
    paths["loss_csv"], paths["loss_png"] = write_loss_curve(folder, loss_rows)
    return paths
