"""Cache keys, result storage and retry policy shared by the stage tasks.

A stage is skipped when its cache key is unchanged. A key is built only from content
fingerprints (source tree digest, manifest hash, VAE / UNet / text-encoder fingerprints,
shard index hash, LoRA file hashes) and the resolved params of the stage's own section;
never from models, pipelines or sessions. Every stage writes its output under a folder named
by its key, so a key also says where the output lives, and a cached result whose output was
deleted is recomputed (`refresh_cache`).

Prefect task results and cache records live under `storage.root/orchestrate.results`, so a
second machine pointing at the same S3 root skips what the first already did.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import Task
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from components.config import BaseConfig, Params
from components.content_hash import canonical_digest, file_sha256
from components.encode import text_encoder_fingerprint
from components.shards import index_path, latent_dir
from components.storage import Storage, StorageUnavailable

KEY_VERSION = 2  # bump to invalidate every cached stage (e.g. when an output layout changes)


def section_digest(section: BaseModel | dict[str, Any]) -> str:
    """sha256 of one resolved params section (or any JSON-able mapping)."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return canonical_digest(data)


def stage_key(stage: str, **inputs: Any) -> str:
    """`STAGE-<32 hex>`: the cache key of a stage from its content fingerprints and params digests."""
    return f"{stage}-{canonical_digest({'stage': stage, 'key_version': KEY_VERSION, **inputs})[:32]}"


def key_parameter(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`: a stage task's `key` parameter, computed by the flow from fingerprints."""
    return str(parameters["key"])


FLOW_OUTPUTS = "stages"  # the keyed outputs of the flows (docs/data.md, "Output layout")

# distill keys that do not change the trained LoRA: where it goes, how often it is checkpointed
DISTILL_OPERATIONAL = {"output", "latents_index", "checkpoint_every", "checkpoints_keep"}


def output_rel(stage: str, key: str, base: str | None = None) -> str:
    """Where a stage's output lives below storage.root: `stages/STAGE/[BASE/]KEY`."""
    return "/".join(p for p in (FLOW_OUTPUTS, stage, base, key) if p)


# --- the cache key of each stage: content fingerprints + its own params section ---------


def base_identity(base_name: str, base: BaseConfig, fingerprints: dict[str, str]) -> dict[str, Any]:
    """What makes a base the same base for caching: its name, settings and module fingerprints.

    The reference (path or hub id) is left out: a moved folder with the same weights is the same base.
    """
    return {"name": base_name, **base.model_dump(mode="json", exclude={"reference"}), "fingerprints": fingerprints}


def curate_key(cfg: Params, source_digest: str, min_side: int) -> str:
    """The source bytes, the curate section and the minimum side."""
    return stage_key("curate", source=source_digest, curate=section_digest(cfg.curate), min_side=min_side)


def encode_key(cfg: Params, base: BaseConfig, manifest_hash: str, fingerprints: dict[str, str]) -> str:
    """The manifest, the VAE (and text encoders when embedded), the resolution and the encode section."""
    te_fp = text_encoder_fingerprint(fingerprints) if cfg.encode.text_embeddings else None
    return stage_key("encode", manifest=manifest_hash, vae=fingerprints["vae"], text_encoder=te_fp,
                     resolution=base.resolution, encode=section_digest(cfg.encode))


def encode_marker(cfg: Params, base: BaseConfig, manifest_hash: str, fingerprints: dict[str, str]) -> str:
    """The index.json whose presence proves the shards of this VAE and manifest are complete."""
    te_fp = text_encoder_fingerprint(fingerprints) if cfg.encode.text_embeddings else None
    return index_path(latent_dir(cfg.encode.output, fingerprints["vae"], base.resolution, manifest_hash, te_fp))


def distill_key(cfg: Params, base_name: str, base: BaseConfig, fingerprints: dict[str, str], index_hash: str) -> str:
    """The base, the shard index and the distill section without its operational keys (and the launch config)."""
    accelerate = cfg.orchestrate.accelerate_config
    return stage_key("distill", base=base_identity(base_name, base, fingerprints), shards=index_hash,
                     distill=section_digest(cfg.distill.model_dump(mode="json", exclude=DISTILL_OPERATIONAL)),
                     accelerate=file_sha256(accelerate) if accelerate else None)


def evaluate_key(cfg: Params, base_name: str, base: BaseConfig, fingerprints: dict[str, str],
                 weights_sha256: str) -> str:
    """The base, the LoRA weights and the evaluate section (its output folder aside)."""
    return stage_key("evaluate", base=base_identity(base_name, base, fingerprints), lora=weights_sha256,
                     evaluate=section_digest(cfg.evaluate.model_dump(mode="json", exclude={"output"})))


def merge_key(cfg: Params, base_name: str, base: BaseConfig, fingerprints: dict[str, str], weights_sha256: str,
              style_sha256: str) -> str:
    """The base, both LoRAs, and the evaluate and merge sections (their paths aside)."""
    return stage_key("merge", base=base_identity(base_name, base, fingerprints), lora=weights_sha256,
                     style=style_sha256, evaluate=section_digest(cfg.evaluate.model_dump(mode="json", exclude={"output"})),
                     merge=section_digest(cfg.merge.model_dump(mode="json",
                                                               exclude={"output", "lcm_folder", "style_file"})))


def publish_key(cfg: Params, name: str, **content: Any) -> str:
    """What is published (LoRA hash, evaluation or merge key), under which name, alias and registry."""
    return stage_key("publish", **content, name=name, alias=cfg.publish.alias, registry=Storage(cfg.registry.root).url())


def run_cached(cfg: Params, task: Task, marker_rel: str, cache_key: str, timeout_s: int | None = None,
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


def retrying(cfg: Params, task: Task) -> Task:
    """A storage or network task with the retry policy from `orchestrate` (exponential backoff)."""
    return task.with_options(**storage_retries(cfg.orchestrate.retries, cfg.orchestrate.retry_delay_s))


def result_storage_block(storage_cfg: Any, results_rel: str) -> str:
    """Save (idempotently) the Prefect filesystem block for task results; return its slug.

    Prefect 3 only accepts result storage that exists server-side; the block is named by the
    root's digest so every root gets its own. Credentials are never stored in the block: S3
    access uses the standard AWS variables or profiles at run time.
    """
    storage = Storage.from_config(storage_cfg)
    name = f"lcmlora-results-{hashlib.sha256(storage.url(results_rel).encode()).hexdigest()[:12]}"
    if storage.is_s3:
        from prefect.filesystems import RemoteFileSystem

        client_kwargs = {k: v for k, v in (("endpoint_url", storage.endpoint_url), ("region_name", storage.region)) if v}
        block = RemoteFileSystem(basepath=storage.url(results_rel), settings={"client_kwargs": client_kwargs})
        block_type = "remote-file-system"
    else:
        from prefect.filesystems import LocalFileSystem

        block = LocalFileSystem(basepath=storage.url(results_rel))
        block_type = "local-file-system"
    block.save(name, overwrite=True)
    return f"{block_type}/{name}"


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only storage and network failures."""
    try:
        state.result()
    except (StorageUnavailable, ConnectionError, TimeoutError):
        return True
    except OSError as exc:
        return not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))
    except Exception:  # noqa: BLE001 - anything else is a real failure: do not retry
        return False
    return False


def storage_retries(retries: int = 3, delay_s: float = 5.0) -> dict[str, Any]:
    """Task options for storage and network steps: retries with exponential backoff."""
    return {
        "retries": retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=delay_s)(retries) if retries else 0,
        "retry_jitter_factor": 0.2,
        "retry_condition_fn": is_transient,
    }


def cached_unless_missing(storage: Storage, marker_rel: str) -> dict[str, Any]:
    """Task options: use the cache, unless the stage's stored output (`marker_rel`) is gone."""
    return {"refresh_cache": not storage.exists(marker_rel)}
