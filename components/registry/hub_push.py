"""A pulled registry version, checked and uploaded to the Hugging Face Hub as a model repository.

    plan = hub_upload_plan(Path("pulled"))           # what would go up; refuses what the Hub would misread
    push_to_hub(plan, "me/toy-lcm-lora", HfApi())    # create_repo (exist_ok) + upload_folder

The folder is what `lcmlora registry pull` wrote (verified against the manifest): its README.md
card must carry the Hub's fields (components/lora/model_card.py `hub_problems`), and no metadata file
may name an absolute local path (components/lineage.py writes portable ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.lora.model_card import ModelCardError, check_model_card, hub_problems
from components.registry.manifest import CARD, RegistryError

STRUCTURED_SUFFIXES = (".json", ".yaml", ".yml")  # metadata whose string values are checked for local paths


@dataclass(frozen=True)
class HubUpload:
    """The folder to upload, its files (relative, sorted) and the card's front matter."""

    folder: Path
    files: list[str]
    card: dict[str, Any]


def absolute_paths(value: Any, field: str = "") -> list[tuple[str, str]]:
    """(field, value) of every string in a JSON/YAML tree that is a local machine path: absolute, or a
    `file://` URI (what `lineage.portable` rewrites); `field` is its dotted key (list items `[i]`)."""
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in absolute_paths(v, f"{field}.{k}" if field else str(k))]
    if isinstance(value, list):
        return [hit for i, v in enumerate(value) for hit in absolute_paths(v, f"{field}[{i}]")]
    return [(field, value)] if isinstance(value, str) and value.startswith(("/", "file://")) else []


def hub_upload_plan(folder: Path) -> HubUpload:
    """Check a pulled version for the Hub; RegistryError listing every problem (card fields, local paths)."""
    folder = Path(folder)
    if not (folder / CARD).is_file():
        raise RegistryError(f"{folder}: no {CARD} model card; pull the version with `lcmlora registry pull` first")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    try:
        card = check_model_card((folder / CARD).read_text(), str(folder / CARD))
    except ModelCardError as exc:
        raise RegistryError(str(exc)) from None
    problems = [f"{CARD}: {p}" for p in hub_problems(card)]
    for rel in files:
        if rel.endswith(STRUCTURED_SUFFIXES):
            leaked = absolute_paths(yaml.safe_load((folder / rel).read_text()))  # JSON is YAML
            problems += [f"{rel}: {field} names a local path {value!r}" for field, value in leaked[:5]]
            if leaked:
                problems.append(f"{rel}: a machine path cannot leave this machine; publish the LoRA again with "
                                "the current lcmlora, which records names, hashes and storage-relative paths")
    if problems:
        raise RegistryError(f"{folder}: not ready for the Hub:\n  - " + "\n  - ".join(problems))
    return HubUpload(folder=folder, files=files, card=card)


def push_to_hub(plan: HubUpload, repo_id: str, api: Any, *, private: bool = False, message: str = "") -> str:
    """Create `repo_id` (if missing) and upload the planned folder with `api.upload_folder`; the commit URL."""
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(plan.folder), repo_id=repo_id, repo_type="model",
                               commit_message=message or f"Upload {plan.card.get('model_name') or repo_id}")
    return str(getattr(commit, "commit_url", commit))
