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

from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from components.content_hash import canonical_digest
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


FLOW_OUTPUTS = "stages"  # flows' keyed outputs, apart from the CLI's fixed folders (curated/, encoded/)


def output_rel(stage: str, key: str, base: str | None = None) -> str:
    """Where a stage's output lives below storage.root: `stages/STAGE/[BASE/]KEY`."""
    return "/".join(p for p in (FLOW_OUTPUTS, stage, base, key) if p)


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
