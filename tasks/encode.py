"""Prefect tasks of the encode stage: base fingerprints and latent pre-encoding."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from components.config import BaseConfig, Params
from components.stages.curate import source_storage
from components.stages.encode import run_encode
from components.storage.storage import Storage
from tasks.artifacts import artifact_key
from tasks.caching import key_parameter
from tasks.progress import task_progress


@task(name="fingerprint-base")
def fingerprint_base(base: BaseConfig) -> dict[str, str]:
    """Fingerprints of the base's UNet, VAE and text encoder(s) (contract 1); loads the base once."""
    from components.stages.inputs import base_fingerprints

    return base_fingerprints(base)


@task(name="fingerprint-vae")
def fingerprint_vae(base: BaseConfig) -> str:
    """Fingerprint of the base's VAE alone (the UNet is not loaded for a folder or hub id)."""
    from components.models.base_model import load_vae

    return load_vae(base.reference)[1]


@task(name="encode", cache_key_fn=key_parameter, persist_result=True)
def encode_latents(cfg: Params, base_name: str, base: BaseConfig, manifest_rel: str,
                   fingerprints: dict[str, str], key: str) -> dict[str, Any]:
    """VAE-encode the curated manifest into latent shards keyed by the VAE fingerprint."""
    from prefect.runtime import flow_run

    progress = task_progress("encode", base_name, f"latent encoding for base {base_name}")
    # The shard folder's claim names the flow run: a retried run (same id) resumes its own claim.
    result = run_encode(cfg.encode, base_name=base_name, base=base, storage=Storage.from_config(cfg.storage),
                        manifest_rel=manifest_rel, source=source_storage(cfg.curate.source, cfg.storage),
                        fingerprints=fingerprints, progress=progress,
                        claim_owner=f"flow-run-{flow_run.id}" if flow_run.id else None)
    progress.finish()
    if result.reused:
        get_run_logger().info("reused latent shards at %s (same VAE %s)", result.index, result.vae_fingerprint)
    create_table_artifact(key=artifact_key("encode", base_name), table=[result.as_dict()],
                          description=f"Latent shards for base {base_name} (VAE {result.vae_fingerprint})")
    return result.as_dict()
