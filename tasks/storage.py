"""Prefect tasks that move artifact folders between the storage root and local working copies.

These are the storage steps: they retry with exponential backoff on connection errors. On a
local storage root nothing is copied (the working copy is the stored folder).
"""

from __future__ import annotations

from prefect import task

from components.config import Params
from components.stages.evaluate import EVALUATED_LORA, copy_for_evaluation
from components.storage.folder_sync import is_complete, pull_folder, push_folder, work_dir
from components.storage.storage import Storage
from tasks.caching import storage_retries


@task(name="fetch-folder", **storage_retries())
def fetch_folder(cfg: Params, rel: str) -> str:
    """A local copy of the stored folder `rel` (complete, verified by its marker)."""
    return str(pull_folder(Storage.from_config(cfg.storage), rel))


@task(name="work-folder")
def work_folder(cfg: Params, rel: str) -> str:
    """The local folder a stage writes before its output is stored at `rel`."""
    return str(work_dir(Storage.from_config(cfg.storage), rel))


@task(name="store-folders", **storage_retries())
def store_folders(cfg: Params, folders: dict[str, str]) -> list[str]:
    """Store each local folder at its relative path (local path -> rel), completion marker last."""
    storage = Storage.from_config(cfg.storage)
    for local, rel in folders.items():
        push_folder(storage, local, rel)
    return list(folders.values())


@task(name="evaluation-copy", **storage_retries())
def evaluation_copy(cfg: Params, lora_rel: str, evaluation_rel: str) -> str:
    """The local copy of the LoRA that the evaluation at `evaluation_rel` judges (and writes into).

    The evaluation writes its gate and report into the LoRA folder it judges, so it judges a
    copy (`EVALUATION/lora/`, the folder publish ships); the distill output stays as
    distillation wrote it. A complete stored evaluation needs no copy.
    """
    storage = Storage.from_config(cfg.storage)
    if is_complete(storage, evaluation_rel):
        return str(pull_folder(storage, evaluation_rel) / EVALUATED_LORA)
    return str(copy_for_evaluation(pull_folder(storage, lora_rel), work_dir(storage, evaluation_rel)))
