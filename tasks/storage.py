"""Prefect tasks that move artifact folders between the storage root and local working copies.

These are the storage steps: they retry with exponential backoff on connection errors. On a
local storage root nothing is copied (the working copy is the stored folder).
"""

from __future__ import annotations

import shutil

from prefect import task

from components.config import Params
from components.folder_sync import pull_folder, push_folder
from components.storage import Storage
from tasks.caching import storage_retries


@task(name="fetch-folder", **storage_retries())
def fetch_folder(cfg: Params, rel: str) -> str:
    """A local copy of the stored folder `rel` (complete, verified by its marker)."""
    return str(pull_folder(Storage.from_config(cfg.storage), rel))


@task(name="store-folders", **storage_retries())
def store_folders(cfg: Params, folders: dict[str, str]) -> list[str]:
    """Store each local folder at its relative path (local path -> rel), completion marker last."""
    storage = Storage.from_config(cfg.storage)
    for local, rel in folders.items():
        push_folder(storage, local, rel)
    return list(folders.values())


@task(name="copy-folder")
def copy_folder(src: str, dest: str, exclude: list[str]) -> str:
    """Copy a local folder (names matching `exclude` left out), e.g. the LoRA an evaluation writes into."""
    shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*exclude))
    return dest
