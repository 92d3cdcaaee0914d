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
from components.content_hash import file_sha256
from components.folder_sync import COMPLETE, work_dir
from components.storage import Storage
from tasks.caching import (
    cached_unless_missing,
    output_rel,
    result_storage_block,
    section_digest,
    stage_key,
    storage_retries,
)
from tasks.curate import curate_manifest, fingerprint_source
from tasks.distill import distill_lora
from tasks.encode import encode_latents
from tasks.evaluate import evaluate_lora
from tasks.merge import merge_variants
from tasks.publish import GateFailed, publish_folder, registry_name
from tasks.storage import copy_folder, fetch_folder, store_folders

# distill keys that do not change the trained LoRA: where it goes, how often it is checkpointed
DISTILL_OPERATIONAL = {"output", "latents_index", "checkpoint_every", "checkpoints_keep"}
EVALUATED_LORA = "lora"  # the evaluated copy of the LoRA folder inside the evaluation's folder


def _run_cached(cfg: Params, task: Task, marker_rel: str, cache_key: str, timeout_s: int | None = None,
                **kwargs: Any) -> dict[str, Any]:
    """Run a stage task with results under the storage root; report whether the cache served it.

    `marker_rel` is the file whose presence proves the stored output is complete: without it
    the cache is refreshed (the task runs again) even when `cache_key` is known.
    """
    storage = Storage.from_config(cfg.storage)
    results = result_storage_block(cfg.storage, cfg.orchestrate.results)
    state = task.with_options(result_storage=results, timeout_seconds=timeout_s,
                              **cached_unless_missing(storage, marker_rel))(cfg=cfg, **kwargs, return_state=True)
    return {**state.result(), "skipped": state.name == "Cached", "key": cache_key}


def _storage_step(cfg: Params, task: Task) -> Task:
    """A storage or network task with the retry policy from `orchestrate` (exponential backoff)."""
    return task.with_options(**storage_retries(cfg.orchestrate.retries, cfg.orchestrate.retry_delay_s))


# --- curate -----------------------------------------------------------------------------


@flow(name="curate")
def curate_flow(cfg: Params, min_side: int) -> dict[str, Any]:
    """Curate the source into a manifest; skipped when the source bytes and curate params are unchanged."""
    source_digest = _storage_step(cfg, fingerprint_source)(cfg)
    key = stage_key("curate", source=source_digest, curate=section_digest(cfg.curate), min_side=min_side)
    return _run_cached(cfg, curate_manifest, f"{output_rel('curate', key)}/manifest.parquet", key,
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
    return _run_cached(cfg, encode_latents, index_rel, key, cfg.orchestrate.encode_timeout_s, base_name=base_name, base=base,
                       manifest_rel=curated["manifest"],
                       fingerprints=fingerprints, key=key)


# --- distill ----------------------------------------------------------------------------


def base_identity(base_name: str, base: BaseConfig, fingerprints: dict[str, str]) -> dict[str, Any]:
    """What makes a base the same base for caching: its name, settings and module fingerprints.

    The reference (path or hub id) is left out: a moved folder with the same weights is the same base.
    """
    return {"name": base_name, **base.model_dump(mode="json", exclude={"reference"}), "fingerprints": fingerprints}


@flow(name="distill")
def distill_flow(cfg: Params, base_name: str, base: BaseConfig, fingerprints: dict[str, str],
                 shards: dict[str, Any]) -> dict[str, Any]:
    """LCD-LoRA for this base; skipped when base, latent shards and distill params are unchanged."""
    accelerate = cfg.orchestrate.accelerate_config
    key = stage_key("distill", base=base_identity(base_name, base, fingerprints), shards=shards["index_hash"],
                    distill=section_digest(cfg.distill.model_dump(mode="json", exclude=DISTILL_OPERATIONAL)),
                    accelerate=file_sha256(accelerate) if accelerate else None)
    return _run_cached(cfg, distill_lora, f"{output_rel('distill', key, base_name)}/{COMPLETE}", key,
                       cfg.orchestrate.distill_timeout_s, base_name=base_name, index_rel=shards["index"], key=key)


# --- evaluate ---------------------------------------------------------------------------


@flow(name="evaluate")
def evaluate_flow(cfg: Params, base_name: str, base: BaseConfig, fingerprints: dict[str, str],
                  lora: dict[str, Any]) -> dict[str, Any]:
    """Sampler matrix, metrics and gate for the LoRA; skipped when LoRA, base and evaluate params are unchanged.

    The evaluation writes its gate and report into the LoRA folder it judges, so it judges a
    copy (`stages/evaluate/BASE/KEY/lora/`, the folder publish ships); the distill output
    stays as distillation wrote it, whatever other evaluations of it conclude.
    """
    key = stage_key("evaluate", base=base_identity(base_name, base, fingerprints), lora=lora["weights_sha256"],
                    evaluate=section_digest(cfg.evaluate.model_dump(mode="json", exclude={"output"})))
    storage = Storage.from_config(cfg.storage)
    out = output_rel("evaluate", key, base_name)
    local = work_dir(storage, out)
    marker = f"{out}/{COMPLETE}"
    if not storage.exists(marker):
        lora_dir = _storage_step(cfg, fetch_folder)(cfg, lora["output"])
        copy_folder(lora_dir, str(local / EVALUATED_LORA), [COMPLETE, "checkpoints", "params.launch.yaml", "launch.log"])
    task = evaluate_lora.with_options(cache_key_fn=lambda *_: key, persist_result=True)
    result = _run_cached(cfg, task, marker, key, cfg.orchestrate.evaluate_timeout_s,
                         base_name=base_name, lora_folder=str(local / EVALUATED_LORA), output=str(local))
    if not result["skipped"]:
        _storage_step(cfg, store_folders)(cfg, {str(local): out})
    return {**result, "evaluation": out, "lora_folder": out, "lora_subdir": EVALUATED_LORA}


# --- merge ------------------------------------------------------------------------------


@flow(name="merge")
def merge_flow(cfg: Params, base_name: str, base: BaseConfig, fingerprints: dict[str, str],
               lora: dict[str, Any]) -> dict[str, Any]:
    """Style-LoRA variants of the gated LoRA; skipped when LoRA, style LoRA, base and params are unchanged."""
    from components.evaluation import project_path

    style = project_path(cfg.merge.style_file)
    if not style.is_file():
        print(f"{base_name}: merge not run: no style LoRA at {style} (merge.style_file); "
              "train the toy one with `lcmlora toy style-lora`")
        return {"skipped": True, "key": "-", "passed": None, "best_folder": None,
                "note": "not run: no style LoRA (merge.style_file)"}
    key = stage_key("merge", base=base_identity(base_name, base, fingerprints), lora=lora["weights_sha256"],
                    style=file_sha256(style), evaluate=section_digest(cfg.evaluate.model_dump(mode="json", exclude={"output"})),
                    merge=section_digest(cfg.merge.model_dump(mode="json", exclude={"output", "lcm_folder", "style_file"})))
    storage = Storage.from_config(cfg.storage)
    out = output_rel("merge", key, base_name)
    lora_dir = _storage_step(cfg, fetch_folder)(cfg, lora["output"])
    result = _run_cached(cfg, merge_variants, f"{out}/{COMPLETE}", key, cfg.orchestrate.merge_timeout_s,
                         base_name=base_name, lora_folder=lora_dir,
                         style_file=str(style), output=str(work_dir(storage, out)), output_rel=out, key=key)
    if not result["skipped"]:
        _storage_step(cfg, store_folders)(cfg, {str(work_dir(storage, out)): out})
    if not result["passed"]:
        result["note"] = ("skipped (unchanged)" if result["skipped"] else "ran") + ": no variant met the merge rule"
        print(f"{base_name}: no style variant published: " + "; ".join(result["violations"]))
    return result


# --- publish ----------------------------------------------------------------------------


@flow(name="publish")
def publish_flow(cfg: Params, base_name: str, lora: dict[str, Any], evaluation: dict[str, Any],
                 merged: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish the gated LoRA (and the best style variant) as new registry versions.

    Skipped when that exact LoRA was already published under that name and alias.
    """
    if not evaluation["passed"]:
        raise GateFailed(base_name, evaluation["violations"])
    results = result_storage_block(cfg.storage, cfg.orchestrate.results)
    registry = Storage(cfg.registry.root).url()
    name = registry_name(cfg, base_name)
    key = stage_key("publish", lora=lora["weights_sha256"], evaluation=evaluation["key"], name=name,
                    alias=cfg.publish.alias, registry=registry)
    state = _storage_step(cfg, publish_folder).with_options(result_storage=results)(
        cfg=cfg, base_name=base_name, folder_rel=evaluation["lora_folder"], subdir=evaluation["lora_subdir"],
        name=name, key=key, return_state=True)
    published = {**state.result(), "skipped": state.name == "Cached", "key": key, "variants": []}
    # The best style variant, when the merge rule picked one: its own name, the merge rule as its gate.
    if merged and merged.get("best_folder"):
        variant = f"{name}-{merged['style']}"
        vkey = stage_key("publish", merged=merged["key"], lora=lora["weights_sha256"], name=variant,
                         alias=cfg.publish.alias, registry=registry)
        vstate = _storage_step(cfg, publish_folder).with_options(result_storage=results)(
            cfg=cfg, base_name=base_name, folder_rel=merged["output"], subdir=merged["best_folder"], name=variant, key=vkey,
            gate={"passed": True, "violations": [], "rule": "merge selection"}, metrics=merged["best_metrics"],
            return_state=True)
        published["variants"].append({**vstate.result(), "skipped": vstate.name == "Cached"})
    return published
