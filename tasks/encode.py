"""Prefect tasks of the encode stage: base fingerprints and latent pre-encoding."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from components.config import BaseConfig, Params
from components.models.base_model import ResolvedBase
from components.stages.encode import encode_stage
from components.storage.storage import Storage
from tasks.artifacts import artifact_key
from tasks.caching import key_parameter
from tasks.progress import task_progress


@task(name="fingerprint-base")
def fingerprint_base(base_name: str, base: BaseConfig) -> ResolvedBase:
    """The base resolved: its UNet, VAE and text encoder(s) fingerprinted (contract 1)."""
    from components.models.base_model import fingerprint_base as fingerprinted

    return fingerprinted(base_name, base)  # the pipeline is not kept: a later task may run elsewhere


@task(name="fingerprint-vae")
def fingerprint_vae(base: BaseConfig) -> str:
    """Fingerprint of the base's VAE alone (the UNet is not loaded for a folder or hub id)."""
    from components.models.base_model import load_vae

    return load_vae(base.reference)[1]


@task(name="encode", cache_key_fn=key_parameter, persist_result=True)
def encode_latents(cfg: Params, base: ResolvedBase, manifest_rel: str, key: str) -> dict[str, Any]:
    """VAE-encode the curated manifest into latent shards keyed by the VAE fingerprint."""
    from prefect.runtime import flow_run

    progress = task_progress("encode", base.name, f"latent encoding for base {base.name}")
    # The shard folder's claim names the flow run: a retried run (same id) resumes its own claim.
    result = encode_stage(cfg, base, Storage.from_config(cfg.storage), manifest=manifest_rel, progress=progress,
                          claim_owner=f"flow-run-{flow_run.id}" if flow_run.id else None)
    progress.finish()
    if result.reused:
        get_run_logger().info("reused latent shards at %s (same VAE %s)", result.index, result.vae_fingerprint)
    create_table_artifact(key=artifact_key("encode", base.name), table=[result.as_dict()],
                          description=f"Latent shards for base {base.name} (VAE {result.vae_fingerprint})")
    return result.as_dict()
