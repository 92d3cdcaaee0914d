"""The distill stage: one base's LCM-LoRA from its latent shards, written as a contract-4 folder.

    output = distill_stage(params, base, storage)   # base: a ResolvedBase; the one call of every caller

`distill_stage` finds the run folder and the shards by key, resumes or reuses, trains and stores.
`run_distill` takes the stage's own section (DistillConfig) and explicit inputs (the base, the
storage holding the shards, where to write) and returns what it produced (`DistillOutput`).
It works in one process or under `accelerate launch` (every rank calls it; rank 0 writes the
artifact). `dry_run` needs no weights: it builds the base's UNet on the meta device from its
config (a diffusers folder such as `data/arch/sdxl`) and counts the LoRA parameters.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.config import BaseConfig, ConfigError, DistillConfig, Params
from components.distill.lcd import LCDSettings
from components.lora.formats import LORA_WEIGHT_NAME
from components.lora.objective import SamplingRecipe, recipe
from components.models.base_model import ResolvedBase
from components.progress import ProgressFn
from components.stages.inputs import distill_rel, encoded_index, stored_sha256
from components.stages.keys import RESUMABLE, output_rel
from components.storage.content_hash import file_sha256
from components.storage.folder_sync import COMPLETE, is_complete, push_folder, work_dir
from components.storage.storage import Storage

ARCH_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "arch"

Batches = Callable[[int, int], Iterable[dict]]  # (rank, world_size) -> this process's batches


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
    """LCDSettings (PCMSettings with `distill.objective: pcm`) from the distill section, the base entry and
    the base's scheduler/VAE configs."""
    prediction = base.prediction_type or scheduler_config.get("prediction_type") or "epsilon"
    if int(scheduler_config.get("num_train_timesteps", cfg.num_train_timesteps)) != cfg.num_train_timesteps:
        raise ConfigError(f"distill.num_train_timesteps={cfg.num_train_timesteps} but the base's scheduler has "
                          f"{scheduler_config.get('num_train_timesteps')}; set it to match")
    lo, hi = guidance_bounds(cfg, base_name, base)
    settings = {"family": family, "prediction_type": prediction, "scaling_factor": float(scaling_factor),
                "guidance_min": lo, "guidance_max": hi, "num_train_timesteps": cfg.num_train_timesteps,
                "num_ddim_timesteps": cfg.num_ddim_timesteps, "timestep_scaling": cfg.timestep_scaling,
                "sigma_data": cfg.sigma_data, "loss_type": cfg.loss_type, "huber_c": cfg.huber_c}
    if cfg.objective == "pcm":
        from components.distill.pcm import PCMSettings

        try:
            return PCMSettings(**settings, pcm_phases=cfg.pcm_phases, pcm_adversarial=cfg.pcm_adversarial)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return LCDSettings(**settings)


def unet_config_for(base: BaseConfig) -> tuple[dict[str, Any], str]:
    """The base's UNet config and where it came from (its folder, or data/arch/FAMILY for a single file)."""
    from components.models.base_model import check_reference

    check_reference(base.reference)
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
    from components.lora.adapter import count_lora_parameters

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
    }


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
    base: ResolvedBase,
    storage: Storage,
    latents_index: str | None,
    output: Path,
    resolved_yaml: str,
    params_digest: str,
    resume: str | None = None,
    batches: Batches | None = None,
    latents_info: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    keep_checkpoints: bool = False,
) -> DistillOutput:
    """Distill an LCM-LoRA for one base and write its artifact folder (contract 4) into `output`.

    `latents_index` (relative to `storage`; `components/stages/inputs.encoded_index` finds the
    one encode wrote for this base) overrides `cfg.latents_index`. `batches(rank,
    world_size)` replaces the shard loader (tests, benchmarks); `latents_info` then describes
    the data for lineage. `resolved_yaml` and `params_digest` are the whole run's resolved
    params, persisted with the artifact. `progress` gets the trainer's per-step reports.
    """
    import torch

    from components import lineage as lin
    from components.distill.artifact import (
        check_distill_output,
        distill_metrics,
        write_distill_artifact,
    )
    from components.distill.lcd import schedule_from_scheduler_config
    from components.distill.trainer import (
        CHECKPOINT_DIR,
        TrainOptions,
        loss_curve_rows,
        train_lcd_lora,
    )
    from components.lora.adapter import add_lora, lora_config, trainable_parameters
    from components.models.conditioning import TextConditioner

    started_at = lin.utc_now()
    # 1. Base: weights, family, fingerprints; LoRA on its UNet.
    loaded = base.load()
    pipe = loaded.pipe
    torch.manual_seed(cfg.seed)  # LoRA A's init: same seed, same run
    unet = add_lora(pipe.unet, lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.target_modules, cfg.lora_dropout))
    n_params = trainable_parameters(unet)
    check_distill_output(output, lora_params=n_params,  # unwritable or full: fail now, not after training
                         checkpoints=cfg.checkpoints_keep if cfg.checkpoint_every else 0)
    scaling_factor = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))

    # 2. Data: the latent shards encoded for this base's VAE (or the given batches).
    if batches is None:
        from components.data.latent_loader import make_loader
        from components.data.shards import read_index

        index_rel = latents_index or cfg.latents_index
        if not index_rel:
            raise ConfigError("distill: no latent shard index given; run `lcmlora encode` first (its pointer "
                              "names the index) or set distill.latents_index")
        index = read_index(storage, index_rel, vae_fingerprint=base.fingerprints["vae"],
                           resolution=base.config.resolution)
        scaling_factor = float(index.get("scaling_factor", scaling_factor))
        latents_info = {"index": index_rel, "index_sha256": stored_sha256(storage, index_rel),  # storage-relative
                        "samples": index.get("count"), "manifest_hash": index.get("manifest_hash")}

        def batches(rank: int, world_size: int) -> Iterable[dict]:
            return make_loader(storage, index_rel, cfg.batch_size, shuffle=True, resample=True, seed=cfg.seed,
                               num_workers=cfg.num_workers, rank=rank, world_size=world_size, drop_last=True)

    settings = lcd_settings(cfg, base.name, base.config, loaded.family, dict(pipe.scheduler.config), scaling_factor)
    alpha_bar = schedule_from_scheduler_config(dict(pipe.scheduler.config))
    conditioner = TextConditioner.from_pipeline(pipe, loaded.family)

    # 3. Train.
    folder = Path(output)
    result = train_lcd_lora(unet, conditioner, batches, settings, alpha_bar, TrainOptions.from_config(cfg), folder,
                            resume=resume, progress=progress)
    if not result.is_main_process:
        return DistillOutput(folder, None, {}, result, {}, n_params)

    # 4. The artifact folder: LoRA in both formats, card, metrics, lineage, config, loss curve.
    base_meta = {"name": base.name, "reference": base.config.reference, "family": loaded.family,
                 "resolution": base.config.resolution, "prediction_type": settings.prediction_type,
                 "fingerprint": base.fingerprint, "hub_id": base.config.hub_id, "license": base.config.license}
    metrics = distill_metrics(result.history, steps=result.steps, seconds=result.seconds,
                              samples_per_second=result.samples_per_second, lora_params=n_params)
    record = lin.collect(
        stage="distill", params_digest=params_digest, started_at=started_at,
        inputs={"base": {"name": base.name, "reference": base.config.reference, "fingerprints": base.fingerprints},
                "latents": latents_info or {}},
        extra={"resolved": {"base": base.config.model_dump(mode="json"), "distill": cfg.model_dump(mode="json"),
                            "guidance_scale_range": [settings.guidance_min, settings.guidance_max],
                            "prediction_type": settings.prediction_type, "scaling_factor": scaling_factor},
               "run": {"steps": result.steps, "world_size": result.world_size, "device": result.device,
                       "mixed_precision": result.mixed_precision, "seconds": round(result.seconds, 2),
                       "resumed_from": result.resumed_from}},
    )
    paths = write_distill_artifact(folder, lora_state_dict=result.lora_state_dict, rank=cfg.lora_rank,
                                   alpha=cfg.lora_alpha, base_meta=base_meta, metrics=metrics, lineage=record,
                                   config_yaml=resolved_yaml, loss_rows=loss_curve_rows(result.history),
                                   recipe=sampling_recipe(cfg))
    if not keep_checkpoints:
        shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)  # finished: nothing left to resume
    return DistillOutput(folder, file_sha256(folder / LORA_WEIGHT_NAME), metrics, result, paths, n_params)


def sampling_recipe(cfg: DistillConfig) -> SamplingRecipe:
    """How the LoRA this section distills samples: LCMScheduler, or TCD at gamma 0 on its phase edges."""
    if cfg.objective == "pcm":
        from components.distill.pcm import pcm_sampling_timesteps

        edges = pcm_sampling_timesteps(cfg.pcm_phases, cfg.num_train_timesteps, cfg.num_ddim_timesteps).tolist()
        return recipe("pcm", cfg.pcm_phases, edges)
    return recipe("lcm")


# --- the run folder: resume by default, start over on request ---------------------------

RESUME_RECORD = "resume.json"  # in checkpoints/: the settings the checkpoints were trained with


def resume_settings(cfg: DistillConfig, base_name: str, base: BaseConfig) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it: the base and the distill section
    without its operational keys and `max_steps` (a longer run may continue a shorter one)."""
    return {"base": {"name": base_name, **base.model_dump(mode="json", exclude={"reference"})},
            "distill": cfg.model_dump(mode="json", exclude=RESUMABLE)}


def _differing(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested mappings."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differing(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def prepare_run_folder(cfg: DistillConfig, base_name: str, base: BaseConfig, folder: Path, *,
                       restart: bool = False) -> tuple[str | None, str | None]:
    """Decide how a run in `folder` starts: `(resume, note)`, `resume` for `run_distill`.

    A complete checkpoint in `folder` written with the same settings (`resume_settings`) is
    resumed from by default ("resuming from checkpoint-100 of FOLDER"); checkpoints of other
    settings are refused, naming the keys that differ. `restart` removes the checkpoints and
    starts at step 0. Only rank 0 (env RANK) changes the folder.
    """
    from components.distill.trainer import CHECKPOINT_DIR, latest_checkpoint, list_checkpoints

    folder = Path(folder)
    checkpoints, record = folder / CHECKPOINT_DIR, folder / CHECKPOINT_DIR / RESUME_RECORD
    wanted = resume_settings(cfg, base_name, base)
    writer = int(os.environ.get("RANK", "0")) == 0
    resume, note = None, None
    if restart:
        found = list_checkpoints(folder)
        if writer:
            shutil.rmtree(checkpoints, ignore_errors=True)
        note = (f"starting over (--restart): removed {len(found)} checkpoint(s) of {folder}" if found
                else f"starting over (--restart) in {folder}")
    elif (latest := latest_checkpoint(folder)) is not None:
        written = json.loads(record.read_text()) if record.is_file() else wanted
        differ = _differing(written, wanted)
        if differ:
            raise ConfigError(f"{checkpoints}: its checkpoints were trained with other settings ({', '.join(differ)} "
                              f"differ, see {record}); pass --restart to start over, or rerun with those settings")
        step = int(latest.name.split("-")[1])
        if step > cfg.max_steps:
            raise ConfigError(f"{latest}: the checkpoint is past distill.max_steps={cfg.max_steps}; raise "
                              "distill.max_steps or pass --restart to start over")
        resume, note = "latest", f"resuming from {latest.name} of {folder}"
    if writer:
        checkpoints.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(wanted, indent=1, sort_keys=True) + "\n")
    return resume, note


@dataclass(frozen=True)
class DistillStageOutput:
    """What the distill stage did for one base. Off rank 0 only `folder` and `main_process` are filled."""

    folder: Path  # the local run folder holding the LoRA (the keyed folder itself on a local root)
    rel: str | None  # stages/distill/BASE/KEY below storage.root (None with an explicit output folder)
    weights_sha256: str | None
    metrics: dict[str, Any]  # metrics.json's "distill" section
    reused: bool = False  # the keyed folder already held this run's finished LoRA: nothing was trained
    note: str | None = None  # how the run started: resumed from a checkpoint, or started over
    main_process: bool = True


Launcher = Callable[[Path, str | None], None]  # (run folder, resume) -> trains there in other processes


def distill_stage(params: Params, base: ResolvedBase, storage: Storage, *, index: str | None = None,
                  output: Path | None = None, key: str | None = None, restart: bool = False,
                  resume: str | None = None, launch: Launcher | None = None,
                  progress: ProgressFn | None = None) -> DistillStageOutput:
    """The distill stage's one call: the base's shards -> its LCM-LoRA, stored under its key.

    `index` (the shard index, relative to `storage`) defaults to the one the base's encode pointer
    names. The run goes to `output`, else to the keyed folder `stages/distill/BASE/KEY` (`key`
    when the caller has computed it); a finished run there is reused unless `restart`. A rerun
    resumes from the folder's checkpoints (`prepare_run_folder`); `restart` starts over, `resume`
    names a checkpoint. `launch` trains in other processes (`accelerate launch`) instead of here.
    """
    # 1. The run folder and the shards it trains on.
    index = index or encoded_index(params, storage, base.name)
    if output is not None:
        rel, folder = None, Path(output)
    else:
        rel = output_rel("distill", key, base.name) if key else distill_rel(params, storage, base)[0]
        folder = work_dir(storage, rel)
    # 2. A finished run of this key is the answer, unless asked to train again.
    if rel and restart:
        storage.delete(f"{rel}/{COMPLETE}")  # no longer the finished run until this one is stored
    elif rel and resume is None and is_complete(storage, rel):
        return DistillStageOutput(folder, rel, stored_sha256(storage, f"{rel}/{LORA_WEIGHT_NAME}"),
                                  json.loads(storage.read_text(f"{rel}/metrics.json"))["distill"], reused=True)
    # 3. Resume from the folder's checkpoints, or start over.
    note = None
    if resume is None:
        resume, note = prepare_run_folder(params.distill, base.name, base.config, folder, restart=restart)
    # 4. Train, in this process or by the launcher.
    if launch is not None:
        launch(folder, resume)
    else:
        out = run_distill(params.distill, base=base, storage=storage, latents_index=index, output=folder,
                          resolved_yaml=params.to_yaml(), params_digest=params.digest(), resume=resume,
                          progress=progress)
        if not out.result.is_main_process:
            return DistillStageOutput(folder, rel, None, {}, note=note, main_process=False)
    # 5. Store the folder under its key (its completion marker last).
    if rel:
        push_folder(storage, folder, rel)
    metrics = json.loads((folder / "metrics.json").read_text())["distill"]
    return DistillStageOutput(folder, rel, file_sha256(folder / LORA_WEIGHT_NAME), metrics, note=note)
