"""One Prefect flow per stage (curate, encode, distill, evaluate, merge, publish).

Each stage flow computes its cache key from content fingerprints and its own params section,
runs its task (or finds it cached), and returns the task's result plus `skipped` (True when
Prefect served the result from the cache: the inputs did not change) and `key`. The nightly
and new-base flows call these in order, one base at a time.
"""

from __future__ import annotations

from typing import Any

from prefect import Task, flow

from components.config import BaseConfig, Params
from components.storage import Storage
from tasks.caching import (
    cached_unless_missing,
    output_rel,
    result_storage_block,
    section_digest,
    stage_key,
)
from tasks.curate import curate_manifest, fingerprint_source
from tasks.encode import encode_latents


def _run_cached(cfg: Params, task: Task, marker_rel: str, **kwargs: Any) -> dict[str, Any]:
    """Run a stage task with results under the storage root; report whether the cache served it."""
    storage = Storage.from_config(cfg.storage)
    results = result_storage_block(cfg.storage, cfg.orchestrate.results)
    state = task.with_options(result_storage=results, **cached_unless_missing(storage, marker_rel))(
        cfg=cfg, **kwargs, return_state=True)
    return {**state.result(), "skipped": state.name == "Cached", "key": kwargs["key"]}


# --- curate -----------------------------------------------------------------------------


@flow(name="curate")
def curate_flow(cfg: Params, min_side: int) -> dict[str, Any]:
    """Curate the source into a manifest; skipped when the source bytes and curate params are unchanged."""
    source_digest = fingerprint_source(cfg)
    key = stage_key("curate", source=source_digest, curate=section_digest(cfg.curate), min_side=min_side)
    return _run_cached(cfg, curate_manifest, f"{output_rel('curated', key)}/manifest.parquet",
                       min_side=min_side, key=key)


# --- encode -----------------------------------------------------------------------------


@flow(name="encode")
def encode_flow(cfg: Params, base_name: str, base: BaseConfig, curated: dict[str, Any],
                fingerprints: dict[str, str]) -> dict[str, Any]:
    """Latent shards for this base's VAE; skipped (and shared) when another base has the same VAE."""
    from components.encode import latent_dir, text_encoder_fingerprint

    te_fp = text_encoder_fingerprint(fingerprints) if cfg.encode.text_embeddings else None
    key = stage_key("encode", manifest=curated["manifest_hash"], vae=fingerprints["vae"], text_encoder=te_fp,
                    resolution=base.resolution, encode=section_digest(cfg.encode))
    index_rel = f"{latent_dir(cfg.encode.output, fingerprints['vae'], base.resolution, curated['manifest_hash'], te_fp)}/index.json"
    return _run_cached(cfg, encode_latents, index_rel, base_name=base_name, base=base,
                       manifest_rel=curated["manifest"], manifest_rows=curated["kept"],
                       fingerprints=fingerprints, key=key)
