"""Prefect tasks of the encode stage: base fingerprints and latent pre-encoding."""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.logging import get_run_logger

from components.config import BaseConfig, Params
from components.storage import Storage
from tasks.caching import key_parameter
from tasks.curate import source_storage


@task(name="fingerprint-base")
def fingerprint_base(base: BaseConfig) -> dict[str, str]:
    """Fingerprints of the base's UNet, VAE and text encoder(s) (contract 1); loads the base once."""
    from components.base_model import load_base

    return dict(load_base(base.reference, base.family).fingerprints)


@task(name="fingerprint-vae")
def fingerprint_vae(base: BaseConfig) -> str:
    """Fingerprint of the base's VAE alone (the UNet is not loaded for a folder or hub id)."""
    from components.base_model import load_vae

    return load_vae(base.reference)[1]


@task(name="encode", cache_key_fn=key_parameter, persist_result=True)
def encode_latents(cfg: Params, base_name: str, base: BaseConfig, manifest_rel: str,
                   fingerprints: dict[str, str], key: str) -> dict[str, Any]:
    """VAE-encode the curated manifest into latent shards keyed by the VAE fingerprint."""
    from components.base_model import load_base, load_vae
    from components.encode import encode_dataset, pipeline_text_embedder, text_encoder_fingerprint

    logger = get_run_logger()
    storage = Storage.from_config(cfg.storage)
    embedder, te_fp = None, None
    if cfg.encode.text_embeddings:
        loaded = load_base(base.reference, base.family)
        vae = loaded.pipe.vae
        embedder = pipeline_text_embedder(loaded.pipe, loaded.family, cfg.encode.device)
        te_fp = text_encoder_fingerprint(fingerprints)
    else:
        vae, _ = load_vae(base.reference)
    progress_id = create_progress_artifact(progress=0.0, key=f"encode-{base_name}",
                                           description=f"latent encoding for base {base_name}")
    done = 0

    def on_batch(advance: int, total: int) -> None:  # encode_dataset's progress callback
        nonlocal done
        done += advance
        update_progress_artifact(progress_id, progress=min(100.0, 100.0 * done / max(1, total)))

    result = encode_dataset(
        storage, manifest_rel, source_storage(cfg), vae, fingerprints["vae"], resolution=base.resolution,
        output=cfg.encode.output, batch_size=cfg.encode.batch_size, shard_size=cfg.encode.shard_size,
        device=cfg.encode.device, dtype=cfg.encode.dtype, workers=getattr(cfg.encode, "workers", 2),
        text_embedder=embedder, text_encoder_fingerprint=te_fp,
        progress=on_batch,
    )
    update_progress_artifact(progress_id, progress=100.0)
    if result.reused:
        logger.info("reused latent shards at %s (same VAE %s)", result.index_rel, fingerprints["vae"])
    index_hash = hashlib.sha256(storage.read_bytes(result.index_rel)).hexdigest()
    create_table_artifact(
        key=f"encode-{base_name}",
        table=[{"index": result.index_rel, "samples": result.samples, "shards": result.shards,
                "encoded_shards": result.encoded_shards, "rejected": len(result.rejected),
                "reused": result.reused, "seconds": round(result.seconds, 1)}],
        description=f"Latent shards for base {base_name} (VAE {fingerprints['vae']})",
    )
    return {"index": result.index_rel, "index_hash": index_hash, "samples": result.samples,
            "shards": result.shards, "reused": result.reused, "vae_fingerprint": fingerprints["vae"]}
