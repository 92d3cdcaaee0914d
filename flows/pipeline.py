"""One base through the stages, in order: the body shared by the nightly and new-base flows."""

from __future__ import annotations

from typing import Any

from prefect import flow

from components.config import BaseConfig, Params
from flows.stages import curate_flow, encode_flow
from tasks.encode import fingerprint_base


def _stage(name: str, outcome: dict[str, Any]) -> dict[str, Any]:
    return {"stage": name, "skipped": outcome["skipped"], "key": outcome["key"]}


@flow(name="base-pipeline", log_prints=True)
def base_pipeline(cfg: Params, base_name: str, base: BaseConfig,
                  fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
    """curate -> encode -> distill -> evaluate (gate) -> merge -> publish for one base."""
    stages: list[dict[str, Any]] = []

    # 1. Fingerprints of the base's modules: they key every later stage.
    fingerprints = fingerprints or fingerprint_base(base)

    # 2. Data: curated manifest at this base's resolution, latent shards for its VAE.
    curated = curate_flow(cfg, min_side=base.resolution)
    stages.append(_stage("curate", curated))
    shards = encode_flow(cfg, base_name, base, curated, fingerprints)
    stages.append(_stage("encode", shards))
    if shards["reused"] and not shards["skipped"]:
        print(f"{base_name}: reused the latent shards of VAE {fingerprints['vae']}")

    return {"stages": stages, "fingerprints": fingerprints, "published": None}
