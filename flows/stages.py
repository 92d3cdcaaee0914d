"""One Prefect flow per stage (curate, encode, distill, evaluate, merge, style-distill, publish).

Each stage flow wires its tasks: the cache key (components/stages/keys.py, from content
fingerprints and the stage's own params section: the same keys name the CLI's output folders), the stage task (served from the cache when the key and
the stored output are there), and the storage steps around it. It returns the task's result
plus `skipped` (True when Prefect served it from the cache) and `key`. The nightly and
new-base flows call these in order, one base at a time.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from components.config import Params
from components.models.base_model import ResolvedBase
from components.stages.evaluate import EVALUATED_LORA
from components.stages.inputs import lora_sha256
from components.stages.keys import (
    curate_key,
    distill_key,
    encode_key,
    encode_marker,
    evaluate_key,
    merge_key,
    output_rel,
    publish_key,
)
from components.stages.publish import registry_name
from components.stages.style_distill import STAGE as STYLE_DISTILL
from components.stages.style_distill import prompts_digest, style_distill_key
from components.storage.folder_sync import COMPLETE
from tasks.caching import result_storage_block, retrying, run_cached
from tasks.curate import curate_manifest, fingerprint_source
from tasks.distill import distill_lora
from tasks.encode import encode_latents
from tasks.evaluate import evaluate_lora
from tasks.merge import find_style_lora, merge_variants
from tasks.publish import publish_folder
from tasks.style_distill import distill_style_variant
from tasks.synthesize import synthesize_source


@flow(name="curate", flow_run_name="curate-{min_side}px")
def curate_flow(cfg: Params, min_side: int) -> dict[str, Any]:
    """Curate the source into a manifest; skipped when the source bytes and curate params are unchanged."""
    # 1. The key: source bytes, curate section, minimum side.
    key = curate_key(cfg, retrying(cfg, fingerprint_source)(cfg), min_side)
    # 2. The manifest (cached while stages/curate/KEY/manifest.parquet is stored).
    return run_cached(cfg, curate_manifest, f"{output_rel('curate', key)}/manifest.parquet", key,
                      min_side=min_side, key=key)


@flow(name="synthesize", flow_run_name="synthesize-{base.name}")
def synthesize_flow(cfg: Params, base: ResolvedBase) -> dict[str, Any]:
    """The base's own samples of the curated captions as its source (bases.NAME.data: synthesize); the stage
    reuses a complete source of its key (the sampled model, prompts and sampler settings)."""
    return retrying(cfg, synthesize_source)(cfg, base)


def on_source(cfg: Params, source_url: str) -> Params:
    """`cfg` curating (and encoding from) another source: a synthesized one."""
    return cfg.model_copy(update={"curate": cfg.curate.model_copy(update={"source": source_url})})


@flow(name="encode", flow_run_name="encode-{base.name}")
def encode_flow(cfg: Params, base: ResolvedBase, curated: dict[str, Any]) -> dict[str, Any]:
    """Latent shards for this base's VAE; skipped (and shared) when another base has the same VAE."""
    # 1. The key: manifest, VAE (and text encoders), resolution, encode section.
    key = encode_key(cfg, base.config, curated["manifest_hash"], base.fingerprints)
    # 2. The shards (cached while their index.json is stored).
    return run_cached(cfg, encode_latents, encode_marker(cfg, base.config, curated["manifest_hash"], base.fingerprints),
                      key, cfg.orchestrate.encode_timeout_s, base=base, manifest_rel=curated["manifest"], key=key)


@flow(name="distill", flow_run_name="distill-{base.name}")
def distill_flow(cfg: Params, base: ResolvedBase, shards: dict[str, Any]) -> dict[str, Any]:
    """LCD-LoRA for this base; skipped when base, latent shards and distill params are unchanged."""
    # 1. The key: base identity, shard index, distill section (operational keys aside).
    key = distill_key(cfg, base.name, base.config, base.fingerprints, shards["index_hash"])
    # 2. The LoRA folder (cached while stages/distill/BASE/KEY is stored complete).
    return run_cached(cfg, distill_lora, f"{output_rel('distill', key, base.name)}/{COMPLETE}", key,
                      cfg.orchestrate.distill_timeout_s, base=base, index_rel=shards["index"], key=key)


@flow(name="evaluate", flow_run_name="evaluate-{base.name}")
def evaluate_flow(cfg: Params, base: ResolvedBase, lora: dict[str, Any]) -> dict[str, Any]:
    """Sampler matrix, metrics and gate for the LoRA; skipped when LoRA, base and evaluate params are unchanged.

    It judges a copy of the LoRA (`stages/evaluate/BASE/KEY/lora/`, the folder publish ships).
    """
    # 1. The key: base identity, LoRA weights, evaluate section.
    key = evaluate_key(cfg, base.name, base.config, base.fingerprints, lora["weights_sha256"])
    out = output_rel("evaluate", key, base.name)
    # 2. The evaluation (cached while stages/evaluate/BASE/KEY is stored complete).
    result = run_cached(cfg, evaluate_lora, f"{out}/{COMPLETE}", key, cfg.orchestrate.evaluate_timeout_s,
                        base=base, lora_rel=lora["output"], key=key)
    return {**result, "evaluation": out, "lora_folder": out, "lora_subdir": EVALUATED_LORA}


@flow(name="merge", flow_run_name="merge-{base.name}")
def merge_flow(cfg: Params, base: ResolvedBase, lora: dict[str, Any]) -> dict[str, Any]:
    """Style-LoRA variants of the gated LoRA; skipped when LoRA, style LoRA, base and params are unchanged."""
    # 1. The style LoRA to merge with; without one the stage does not run.
    style = find_style_lora(cfg, base.name)
    if style is None:
        return {"skipped": True, "key": "-", "passed": None, "best_folder": None,
                "note": "not run: no style LoRA (merge.style_file)"}
    # 2. The key: base identity, both LoRAs, evaluate and merge sections.
    key = merge_key(cfg, base.name, base.config, base.fingerprints, lora["weights_sha256"], lora_sha256(style))
    # 3. The variants, each evaluated (cached while stages/merge/BASE/KEY is stored complete).
    result = run_cached(cfg, merge_variants, f"{output_rel('merge', key, base.name)}/{COMPLETE}", key,
                        cfg.orchestrate.merge_timeout_s, base=base, style_file=style, lora_rel=lora["output"], key=key)
    if not result["passed"]:
        result["note"] = ("skipped (unchanged)" if result["skipped"] else "ran") + ": no variant met the merge rule"
    return result


@flow(name="style-distill", flow_run_name="style-distill-{base.name}")
def style_distill_flow(cfg: Params, base: ResolvedBase, curated: dict[str, Any],
                       merged: dict[str, Any]) -> dict[str, Any]:
    """An LCM-LoRA distilled for base + style, where the merge lost the style; skipped when base, style LoRA,
    the prompts it samples (the curated captions) and the sections it runs under are unchanged."""
    # 1. The style LoRA the merge used, and the key: base identity, style LoRA and its l1, prompts, sections.
    style = find_style_lora(cfg, base.name)
    key = style_distill_key(cfg, base, lora_sha256(style), cfg.synthesize.style_weight,
                            prompts_digest(cfg, curated["manifest_hash"]))
    # 2. The variant: synthesize -> curate -> encode -> distill -> evaluate on the fused model (cached while
    #    stages/style_distill/BASE/KEY is stored complete).
    result = run_cached(cfg, distill_style_variant, f"{output_rel(STYLE_DISTILL, key, base.name)}/{COMPLETE}", key,
                        cfg.orchestrate.distill_timeout_s, base=base, style_file=style, merge_rel=merged.get("output"),
                        key=key)
    if not result["passed"]:
        result["note"] = ("skipped (unchanged)" if result["skipped"] else "ran") + ": its evaluation gate failed"
    return result


@flow(name="publish", flow_run_name="publish-{base_name}")
def publish_flow(cfg: Params, base_name: str, lora: dict[str, Any], evaluation: dict[str, Any],
                 merged: dict[str, Any] | None = None, styled: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish the gated LoRA (and the best style variant) as new registry versions.

    The style variant is the merge's selected one, or (`styled`, where the merge lost the style) the
    LCM-LoRA distilled for the style model, when its evaluation gate passed. The caller has enforced the
    LoRA's gate. Skipped when that exact LoRA was already published under that name and alias.
    """
    results = result_storage_block(cfg.storage, cfg.orchestrate.results)
    publish = retrying(cfg, publish_folder).with_options(result_storage=results)
    # 1. The evaluated LoRA.
    name = registry_name(cfg.publish, base_name, cfg.distill.objective)
    key = publish_key(cfg, name, lora=lora["weights_sha256"], evaluation=evaluation["key"])
    state = publish(cfg=cfg, base_name=base_name, folder_rel=evaluation["lora_folder"],
                    subdir=evaluation["lora_subdir"], name=name, key=key, return_state=True)
    published = {**state.result(), "skipped": state.name == "Cached", "key": key, "variants": []}
    # 2. The best style variant, when the merge rule picked one: its own name, the merge rule as its gate.
    if merged and merged.get("best_folder"):
        variant = f"{name}-{merged['style']}"
        vkey = publish_key(cfg, variant, merged=merged["key"], lora=lora["weights_sha256"])
        vstate = publish(cfg=cfg, base_name=base_name, folder_rel=merged["output"], subdir=merged["best_folder"],
                         name=variant, key=vkey, gate={"passed": True, "violations": [], "rule": "merge selection"},
                         metrics=merged["best_metrics"], return_state=True)
        published["variants"].append({**vstate.result(), "skipped": vstate.name == "Cached"})
    # 3. Else the style-distilled variant, under the same name, its evaluation gate (on the fused model) as its gate.
    elif styled and styled["passed"]:
        variant = f"{name}-{styled['style']}"
        vkey = publish_key(cfg, variant, style_distill=styled["key"], lora=styled["weights_sha256"])
        vstate = publish(cfg=cfg, base_name=base_name, folder_rel=styled["output"], subdir=styled["lora_subdir"],
                         name=variant, key=vkey, gate={"passed": True, "violations": [],
                                                       "rule": "evaluation gate on the style model"},
                         metrics=styled["metrics"], return_state=True)
        published["variants"].append({**vstate.result(), "skipped": vstate.name == "Cached", "method": "distilled"})
    return published
