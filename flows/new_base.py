"""The new-base flow: register a fine-tuned base, then distill, evaluate, merge and publish for it.

Started by `lcmlora new-base REF [--name NAME]`, by the `new-base` deployment, or by the
`lcmlora.base.registered` event (infra/prefect.yaml). A fine-tune usually keeps its parent's
VAE: the base then inherits the parent's resolution and guidance from params.yaml, and the
curate and encode stages are served from the cache (the latent shards are keyed by VAE
fingerprint and reused as they are).
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from components.config import BaseConfig, ConfigError, Params, load_params
from components.models.base_model import ResolvedBase, resolve_base
from components.preflight import preflight
from components.run_summary import verdict
from flows.pipeline import base_pipeline
from tasks.curate import ensure_source
from tasks.encode import fingerprint_base, fingerprint_vae
from tasks.publish import register_base
from tasks.runtime import set_torch_threads


def register_config(cfg: Params, reference: str, name: str | None = None,
                    family: str | None = None) -> tuple[str, BaseConfig]:
    """The base's name and config: from params.yaml when REF names a base there, else detected."""
    base_name, base = resolve_base(cfg, reference)
    if name:
        from components.registry.manifest import validate_name

        base_name = validate_name(name, "base name")
    if family:
        if family not in ("sd15", "sdxl"):
            raise ConfigError(f"--family {family!r}: expected sd15 or sdxl")
        base = base.model_copy(update={"family": family})
    return base_name, base


def inherit_from_parent(cfg: Params, base: ResolvedBase, parents: dict[str, str]) -> tuple[ResolvedBase, str | None]:
    """Resolution and guidance of the params base that shares this base's VAE (its parent), if any."""
    if base.name in cfg.bases:
        return base, None
    for parent, vae_fp in parents.items():
        if vae_fp == base.fingerprints["vae"]:
            p = cfg.bases[parent]
            return base.with_config(base.config.model_copy(update={
                "resolution": p.resolution, "guidance_scale": p.guidance_scale,
                "prediction_type": p.prediction_type, "judges": p.judges})), parent
    return base, None


@flow(name="new-base", flow_run_name="new-base-{reference}")
def new_base(reference: str, name: str | None = None, family: str | None = None,
             params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Register the base at `reference` and run its pipeline; gate failure publishes nothing."""
    cfg = load_params(params_file, overrides)

    # 1. Name, family and fingerprints of the new base; its parent is the params base with its VAE.
    set_torch_threads(cfg.orchestrate.torch_threads)
    if cfg.orchestrate.toy_source_if_missing:
        ensure_source(cfg)
    base_name, config = register_config(cfg, reference, name or None, family or None)
    resolved = fingerprint_base(base_name, config)
    parents = {n: fingerprint_vae(b) for n, b in cfg.bases.items() if n != base_name}
    resolved, parent = inherit_from_parent(cfg, resolved, parents)
    if parent:
        get_run_logger().info("%s: shares the VAE of %s (%s): its latent shards are reused",
                              base_name, parent, resolved.fingerprints["vae"])
    preflight(cfg, {base_name: resolved.config})  # every stage's inputs, with the judges inherited from the parent
    record = register_base(cfg, resolved, parent)

    # 2. The stages (curate and encode come from the cache when the VAE matches).
    result = base_pipeline(cfg, base_name, resolved.config, resolved=resolved)
    summary = {"bases": {base_name: {"status": "completed", "registered": record, **result}}}
    summary["verdict"] = verdict(summary)
    return summary
