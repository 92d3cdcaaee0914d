"""The Prefect side of caching: cache key parameter, result storage and retry policy of the stage tasks.

A stage is skipped when its cache key is unchanged. The keys themselves (content fingerprints
and the stage's own params section) come from `components/stages/keys.py`, the same functions
the CLI uses for its output folders: every stage writes under a folder named by its key, so a
key also says where the output lives, and a cached result whose output was deleted is
recomputed (`refresh_cache`).

Prefect task results and cache records live under `storage.root/orchestrate.results`, so a
second machine pointing at the same S3 root skips what the first already did.
"""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import Task
from prefect.tasks import exponential_backoff

from components.config import Params
from components.storage.storage import Storage, StorageUnavailable


def key_parameter(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`: a stage task's `key` parameter, computed by the flow from fingerprints."""
    return str(parameters["key"])


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
