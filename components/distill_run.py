"""One distillation run for one base: resolve settings, load base and latent shards, train, write the artifact.

`dry_run` needs no weights: it builds the base's UNet on the meta device from its config
(a diffusers folder such as `data/arch/sdxl`) and counts the LoRA parameters. `run_distill`
is what the CLI and the Prefect task call; it works in one process or under
`accelerate launch` (every rank calls it; rank 0 writes the artifact).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import BaseConfig, ConfigError, Params

ARCH_DIR = Path(__file__).resolve().parent.parent / "data" / "arch"


def guidance_bounds(params: Params, base_name: str, base: BaseConfig) -> tuple[float, float]:
    """CFG-scale bounds of omega: `distill.guidance_range[base]` if set, else the base's fixed guidance_scale."""
    if base_name in params.distill.guidance_range:
        lo, hi = params.distill.guidance_range[base_name]
        if not 1.0 <= lo <= hi:
            raise ConfigError(f"distill.guidance_range.{base_name}: expected [min, max] with 1 <= min <= max, got [{lo}, {hi}]")
        return float(lo), float(hi)
    return float(base.guidance_scale), float(base.guidance_scale)


def lcd_settings(params: Params, base_name: str, base: BaseConfig, family: str, scheduler_config: dict[str, Any],
                 scaling_factor: float):
    """LCDSettings from params, the base entry and the base's scheduler/VAE configs."""
    from components.distill import LCDSettings

    d = params.distill
    prediction = base.prediction_type or scheduler_config.get("prediction_type") or "epsilon"
    if int(scheduler_config.get("num_train_timesteps", d.num_train_timesteps)) != d.num_train_timesteps:
        raise ConfigError(f"distill.num_train_timesteps={d.num_train_timesteps} but the base's scheduler has "
                          f"{scheduler_config.get('num_train_timesteps')}; set it to match")
    lo, hi = guidance_bounds(params, base_name, base)
    return LCDSettings(family=family, prediction_type=prediction, scaling_factor=float(scaling_factor),
                       guidance_min=lo, guidance_max=hi, num_train_timesteps=d.num_train_timesteps,
                       num_ddim_timesteps=d.num_ddim_timesteps, timestep_scaling=d.timestep_scaling,
                       sigma_data=d.sigma_data, loss_type=d.loss_type, huber_c=d.huber_c)


def unet_config_for(base: BaseConfig) -> tuple[dict[str, Any], str]:
    """The base's UNet config and where it came from (its folder, or data/arch/FAMILY for a single file)."""
    import json

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
            raise ConfigError(f"bases reference {base.reference}: cannot read unet/config.json ({type(exc).__name__}); "
                              "use a local diffusers folder (e.g. data/arch/sd15) for --dry-run") from None
    if not path.exists():
        raise FileNotFoundError(f"{path}: no UNet config for base {base.reference}")
    return json.loads(path.read_text()), str(path)


def dry_run(params: Params, base_ref: str) -> dict[str, Any]:
    """Resolved config of the run plus `lora_trainable_params` from the meta-device UNet (no weights)."""
    from components.base_model import resolve_base
    from components.lora import count_lora_parameters

    name, base = resolve_base(params, base_ref)
    config, source = unet_config_for(base)
    d = params.distill
    n = count_lora_parameters(config, d.lora_rank, d.lora_alpha, d.target_modules)
    lo, hi = guidance_bounds(params, name, base)
    return {
        "base_name": name,
        "base": base.model_dump(mode="json"),
        "distill": d.model_dump(mode="json"),
        "guidance_scale_range": [lo, hi],
        "unet_config": source,
        "lora_trainable_params": n,
        "output": str(Path(d.output) / name),
    }


def find_latents_index(storage: Any, params: Params, base: BaseConfig, fingerprints: dict[str, str]) -> str:
    """The shard index for this base: `distill.latents_index`, or the one encode wrote for its VAE and resolution."""
    if params.distill.latents_index:
        return params.distill.latents_index
    from components.encode import text_encoder_fingerprint

    folder = f"{params.encode.output.strip('/')}/{fingerprints['vae']}"
    try:
        names = storage.ls(folder)
    except FileNotFoundError:
        names = []
    names = [n.rstrip("/").rsplit("/", 1)[-1] for n in names]
    te = text_encoder_fingerprint(fingerprints)[:16]
    candidates = [n for n in names if n.startswith(f"{base.resolution}px-") and storage.exists(f"{folder}/{n}/index.json")]
    with_emb = [n for n in candidates if n.endswith(f"-te{te}")]
    plain = [n for n in candidates if "-te" not in n]
    pick = with_emb or plain
    if len(pick) != 1:
        found = ", ".join(candidates) or "none"
        raise FileNotFoundError(
            f"{storage.url(folder)}: expected one latent index for VAE {fingerprints['vae']} at {base.resolution}px, "
            f"found {found}; run `lcmlora encode --base ...` or set distill.latents_index"
        )
    return f"{folder}/{pick[0]}/index.json"


@dataclass
class DistillOutcome:
    folder: Path
    result: Any  # distill.TrainResult
    paths: dict[str, Path]
    lora_trainable_params: int


def run_distill(
    params: Params,
    base_ref: str,
    *,
    output: str | Path | None = None,
    resume: str | None = None,
    batches: Callable[[int, int], Iterable[dict]] | None = None,
    latents_info: dict[str, Any] | None = None,
    on_step: Callable[[Any], None] | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
    keep_checkpoints: bool = False,
) -> DistillOutcome:
    """Distill an LCM-LoRA for one base and write its artifact folder (contract 4).

    `batches(rank, world_size)` overrides the latent shard loader (tests, benchmarks);
    `latents_info` then describes the data for lineage.
    """
    import torch

    from components import lineage as lin
    from components.base_model import load_base, resolve_base
    from components.distill import TrainOptions, loss_curve_rows, train_lcd_lora, TextConditioner
    from components.distill_artifact import distill_metrics, write_distill_artifact
    from components.lcd import schedule_from_scheduler_config
    from components.lora import add_lora, lora_config, trainable_parameters

    started_at = lin.utc_now()
    d = params.distill
    # 1. Base: weights, family, fingerprints; LoRA on its UNet.
    name, base = resolve_base(params, base_ref)
    loaded = load_base(base.reference, base.family)
    pipe = loaded.pipe
    torch.manual_seed(d.seed)  # LoRA A's init: same seed, same run
    unet = add_lora(pipe.unet, lora_config(d.lora_rank, d.lora_alpha, d.target_modules, d.lora_dropout))
    n_params = trainable_parameters(unet)
    scaling_factor = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))

    # 2. Data: the latent shards encoded for this base's VAE (or the given batches).
    if batches is None:
        from components.latent_loader import make_loader, read_index
        from components.storage import Storage

        storage = Storage.from_config(params.storage)
        index_rel = find_latents_index(storage, params, base, loaded.fingerprints)
        index = read_index(storage, index_rel, vae_fingerprint=loaded.fingerprints["vae"], resolution=base.resolution)
        scaling_factor = float(index.get("scaling_factor", scaling_factor))
        latents_info = {"index": storage.url(index_rel),
                        "index_sha256": hashlib.sha256(storage.read_bytes(index_rel)).hexdigest(),
                        "samples": index.get("count"), "manifest_hash": index.get("manifest_hash")}

        def batches(rank: int, world_size: int) -> Iterable[dict]:
            return make_loader(storage, index_rel, d.batch_size, shuffle=True, resample=True, seed=d.seed,
                               num_workers=d.num_workers, rank=rank, world_size=world_size, drop_last=True)

    settings = lcd_settings(params, name, base, loaded.family, dict(pipe.scheduler.config), scaling_factor)
    alpha_bar = schedule_from_scheduler_config(dict(pipe.scheduler.config))
    conditioner = TextConditioner.from_pipeline(pipe, loaded.family)

    # 3. Train.
    folder = Path(output) if output else Path(d.output) / name
    result = train_lcd_lora(unet, conditioner, batches, settings, alpha_bar, TrainOptions.from_config(d), folder,
                            resume=resume, on_step=on_step, on_checkpoint=on_checkpoint)
    paths: dict[str, Path] = {}
    if result.is_main_process:
        # 4. The artifact folder: LoRA in both formats, card, metrics, lineage, config, loss curve.
        base_meta = {"name": name, "reference": base.reference, "family": loaded.family,
                     "resolution": base.resolution, "prediction_type": settings.prediction_type,
                     "fingerprint": loaded.fingerprint}
        metrics = distill_metrics(result.history, steps=result.steps, seconds=result.seconds,
                                  samples_per_second=result.samples_per_second, lora_params=n_params)
        record = lin.collect(
            stage="distill", params_digest=params.digest(), started_at=started_at,
            inputs={"base": {"name": name, "reference": base.reference, "fingerprints": loaded.fingerprints},
                    "latents": latents_info or {}},
            extra={"resolved": {"base": base.model_dump(mode="json"), "distill": d.model_dump(mode="json"),
                                "guidance_scale_range": [settings.guidance_min, settings.guidance_max],
                                "prediction_type": settings.prediction_type, "scaling_factor": scaling_factor},
                   "run": {"steps": result.steps, "world_size": result.world_size, "device": result.device,
                           "mixed_precision": result.mixed_precision, "seconds": round(result.seconds, 2),
                           "resumed_from": result.resumed_from}},
        )
        paths = write_distill_artifact(folder, lora_state_dict=result.lora_state_dict, rank=d.lora_rank,
                                       alpha=d.lora_alpha, base_meta=base_meta, metrics=metrics, lineage=record,
                                       config_yaml=params.to_yaml(), loss_rows=loss_curve_rows(result.history))
        if not keep_checkpoints:
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # finished: nothing left to resume
    return DistillOutcome(folder, result, paths, n_params)
