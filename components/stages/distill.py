"""The distill stage: one base's LCM-LoRA from its latent shards, written as a contract-4 folder.

`run_distill` takes the stage's own section (DistillConfig) and explicit inputs (the base, the
storage holding the shards, where to write) and returns what it produced (`DistillOutput`).
It works in one process or under `accelerate launch` (every rank calls it; rank 0 writes the
artifact). `dry_run` needs no weights: it builds the base's UNet on the meta device from its
config (a diffusers folder such as `data/arch/sdxl`) and counts the LoRA parameters.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.config import BaseConfig, ConfigError, DistillConfig
from components.lcd import LCDSettings
from components.progress import ProgressFn
from components.storage import Storage

ARCH_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "arch"

Batches = Callable[[int, int], Iterable[dict]]  # (rank, world_size) -> this process's batches


def run_folder(cfg: DistillConfig, base_name: str) -> Path:
    """The default output folder of a base's run: `distill.output/BASE`."""
    return Path(cfg.output) / base_name


def guidance_bounds(cfg: DistillConfig, base_name: str, base: BaseConfig) -> tuple[float, float]:
    """CFG-scale bounds of omega: `distill.guidance_range[base]`, else the base's fixed guidance_scale."""
    if base_name in cfg.guidance_range:
        lo, hi = cfg.guidance_range[base_name]
        if not 1.0 <= lo <= hi:
            raise ConfigError(f"distill.guidance_range.{base_name}: expected [min, max] with 1 <= min <= max, "
                              f"got [{lo}, {hi}]")
        return float(lo), float(hi)
    return float(base.guidance_scale), float(base.guidance_scale)


def lcd_settings(cfg: DistillConfig, base_name: str, base: BaseConfig, family: str,
                 scheduler_config: dict[str, Any], scaling_factor: float) -> LCDSettings:
    """LCDSettings from the distill section, the base entry and the base's scheduler/VAE configs."""
    prediction = base.prediction_type or scheduler_config.get("prediction_type") or "epsilon"
    if int(scheduler_config.get("num_train_timesteps", cfg.num_train_timesteps)) != cfg.num_train_timesteps:
        raise ConfigError(f"distill.num_train_timesteps={cfg.num_train_timesteps} but the base's scheduler has "
                          f"{scheduler_config.get('num_train_timesteps')}; set it to match")
    lo, hi = guidance_bounds(cfg, base_name, base)
    return LCDSettings(family=family, prediction_type=prediction, scaling_factor=float(scaling_factor),
                       guidance_min=lo, guidance_max=hi, num_train_timesteps=cfg.num_train_timesteps,
                       num_ddim_timesteps=cfg.num_ddim_timesteps, timestep_scaling=cfg.timestep_scaling,
                       sigma_data=cfg.sigma_data, loss_type=cfg.loss_type, huber_c=cfg.huber_c)


def unet_config_for(base: BaseConfig) -> tuple[dict[str, Any], str]:
    """The base's UNet config and where it came from (its folder, or data/arch/FAMILY for a single file)."""
    ref = Path(base.reference)
    if ref.is_dir():
        path = ref / "unet" / "config.json"
    elif base.reference.endswith(".safetensors"):
        path = ARCH_DIR / base.family / "unet" / "config.json"
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(base.reference, "unet/config.json"))
        except Exception as exc:  # noqa: BLE001 - offline or unknown id: say what to do
            raise ConfigError(f"bases reference {base.reference}: cannot read unet/config.json "
                              f"({type(exc).__name__}); use a local diffusers folder (e.g. data/arch/sd15) "
                              "for --dry-run") from None
    if not path.exists():
        raise FileNotFoundError(f"{path}: no UNet config for base {base.reference}")
    return json.loads(path.read_text()), str(path)


def dry_run(cfg: DistillConfig, *, base_name: str, base: BaseConfig) -> dict[str, Any]:
    """The resolved run plus `lora_trainable_params` from the meta-device UNet (no weights)."""
    from components.lora import count_lora_parameters

    config, source = unet_config_for(base)
    n = count_lora_parameters(config, cfg.lora_rank, cfg.lora_alpha, cfg.target_modules)
    lo, hi = guidance_bounds(cfg, base_name, base)
    return {
        "base_name": base_name,
        "base": base.model_dump(mode="json"),
        "distill": cfg.model_dump(mode="json"),
        "guidance_scale_range": [lo, hi],
        "unet_config": source,
        "lora_trainable_params": n,
        "output": str(run_folder(cfg, base_name)),
    }


def find_latents_index(storage: Storage, encode_output: str, base: BaseConfig,
                       fingerprints: dict[str, str]) -> str:
    """The shard index encode wrote for this base's VAE and resolution, under `encode_output`."""
    from components.encode import text_encoder_fingerprint

    folder = f"{encode_output.strip('/')}/{fingerprints['vae']}"
    try:
        names = storage.ls(folder)
    except FileNotFoundError:
        names = []
    names = [n.rstrip("/").rsplit("/", 1)[-1] for n in names]
    te = text_encoder_fingerprint(fingerprints)[:16]
    candidates = [n for n in names
                  if n.startswith(f"{base.resolution}px-") and storage.exists(f"{folder}/{n}/index.json")]
    with_emb = [n for n in candidates if n.endswith(f"-te{te}")]
    plain = [n for n in candidates if "-te" not in n]
    pick = with_emb or plain
    if len(pick) != 1:
        found = ", ".join(candidates) or "none"
        raise FileNotFoundError(
            f"{storage.url(folder)}: expected one latent index for VAE {fingerprints['vae']} at "
            f"{base.resolution}px, found {found}; run `lcmlora encode --base ...` or set distill.latents_index"
        )
    return f"{folder}/{pick[0]}/index.json"


@dataclass(frozen=True)
class DistillOutput:
    """What the distill stage produced. On ranks other than 0 only `result` is filled."""

    folder: Path  # the contract-4 artifact folder
    weights_sha256: str | None  # sha256 of LORA_WEIGHT_NAME in `folder` (None off rank 0)
    metrics: dict[str, Any]  # metrics.json's "distill" section
    result: Any  # trainer.TrainResult
    paths: dict[str, Path] = field(default_factory=dict)  # artifact files by role
    lora_trainable_params: int = 0


def run_distill(
    cfg: DistillConfig,
    *,
    base_name: str,
    base: BaseConfig,
    storage: Storage,
    latents_index: str | None,
    output: Path,
    resolved_yaml: str,
    params_digest: str,
    encode_output: str = "latents",
    resume: str | None = None,
    batches: Batches | None = None,
    latents_info: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    keep_checkpoints: bool = False,
) -> DistillOutput:
    """Distill an LCM-LoRA for one base and write its artifact folder (contract 4) into `output`.

    `latents_index` (relative to `storage`) overrides `cfg.latents_index`; with neither, the
    index encode wrote under `encode_output` for this base's VAE is used. `batches(rank,
    world_size)` replaces the shard loader (tests, benchmarks); `latents_info` then describes
    the data for lineage. `resolved_yaml` and `params_digest` are the whole run's resolved
    params, persisted with the artifact. `progress` gets the trainer's per-step reports.
    """
    import torch

    from components import lineage as lin
    from components.base_model import load_base
    from components.conditioning import TextConditioner
    from components.content_hash import file_sha256
    from components.distill_artifact import distill_metrics, write_distill_artifact
    from components.lcd import schedule_from_scheduler_config
    from components.lora import add_lora, lora_config, trainable_parameters
    from components.lora_formats import LORA_WEIGHT_NAME
    from components.trainer import CHECKPOINT_DIR, TrainOptions, loss_curve_rows, train_lcd_lora

    started_at = lin.utc_now()
    # 1. Base: weights, family, fingerprints; LoRA on its UNet.
    loaded = load_base(base.reference, base.family)
    pipe = loaded.pipe
    torch.manual_seed(cfg.seed)  # LoRA A's init: same seed, same run
    unet = add_lora(pipe.unet, lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.target_modules, cfg.lora_dropout))
    n_params = trainable_parameters(unet)
    scaling_factor = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))

    # 2. Data: the latent shards encoded for this base's VAE (or the given batches).
    if batches is None:
        from components.latent_loader import make_loader
        from components.shards import read_index

        index_rel = (latents_index or cfg.latents_index
                     or find_latents_index(storage, encode_output, base, loaded.fingerprints))
        index = read_index(storage, index_rel, vae_fingerprint=loaded.fingerprints["vae"],
                           resolution=base.resolution)
        scaling_factor = float(index.get("scaling_factor", scaling_factor))
        latents_info = {"index": storage.url(index_rel),
                        "index_sha256": hashlib.sha256(storage.read_bytes(index_rel)).hexdigest(),
                        "samples": index.get("count"), "manifest_hash": index.get("manifest_hash")}

        def batches(rank: int, world_size: int) -> Iterable[dict]:
            return make_loader(storage, index_rel, cfg.batch_size, shuffle=True, resample=True, seed=cfg.seed,
                               num_workers=cfg.num_workers, rank=rank, world_size=world_size, drop_last=True)

    settings = lcd_settings(cfg, base_name, base, loaded.family, dict(pipe.scheduler.config), scaling_factor)
    alpha_bar = schedule_from_scheduler_config(dict(pipe.scheduler.config))
    conditioner = TextConditioner.from_pipeline(pipe, loaded.family)

    # 3. Train.
    folder = Path(output)
    result = train_lcd_lora(unet, conditioner, batches, settings, alpha_bar, TrainOptions.from_config(cfg), folder,
                            resume=resume, progress=progress)
    if not result.is_main_process:
        return DistillOutput(folder, None, {}, result, {}, n_params)

    # 4. The artifact folder: LoRA in both formats, card, metrics, lineage, config, loss curve.
    base_meta = {"name": base_name, "reference": base.reference, "family": loaded.family,
                 "resolution": base.resolution, "prediction_type": settings.prediction_type,
                 "fingerprint": loaded.fingerprint, "hub_id": base.hub_id, "license": base.license}
    metrics = distill_metrics(result.history, steps=result.steps, seconds=result.seconds,
                              samples_per_second=result.samples_per_second, lora_params=n_params)
    record = lin.collect(
        stage="distill", params_digest=params_digest, started_at=started_at,
        inputs={"base": {"name": base_name, "reference": base.reference, "fingerprints": loaded.fingerprints},
                "latents": latents_info or {}},
        extra={"resolved": {"base": base.model_dump(mode="json"), "distill": cfg.model_dump(mode="json"),
                            "guidance_scale_range": [settings.guidance_min, settings.guidance_max],
                            "prediction_type": settings.prediction_type, "scaling_factor": scaling_factor},
               "run": {"steps": result.steps, "world_size": result.world_size, "device": result.device,
                       "mixed_precision": result.mixed_precision, "seconds": round(result.seconds, 2),
                       "resumed_from": result.resumed_from}},
    )
    paths = write_distill_artifact(folder, lora_state_dict=result.lora_state_dict, rank=cfg.lora_rank,
                                   alpha=cfg.lora_alpha, base_meta=base_meta, metrics=metrics, lineage=record,
                                   config_yaml=resolved_yaml, loss_rows=loss_curve_rows(result.history))
    if not keep_checkpoints:
        shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)  # finished: nothing left to resume
    return DistillOutput(folder, file_sha256(folder / LORA_WEIGHT_NAME), metrics, result, paths, n_params)
