"""Lineage (DESIGN contract 4, `lineage.json`): where an artifact came from.

Every artifact records the code (git commit and whether the tree was dirty), the data
pipeline state (sha256 of `dvc.lock` and the DVC version), the resolved params digest, its
inputs' fingerprints, the hardware and the wall-clock times. Nothing here reads credentials:
only git, files in the repository and the local machine's description.

Artifacts travel (registry, Hub), so what they record holds no absolute local path: `portable`
makes a path inside the repository repository-relative and names any other local path by its last
part, `local:NAME` (a published folder carries no machine's path: the Hub refuses one; s3:// and hub
ids stay as they are); `write_lineage`, `portable_yaml` (the resolved config) and the evaluation's
metrics apply it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import yaml

from components.paths import PROJECT_ROOT


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_revision(repo: str | Path = ".") -> dict[str, Any]:
    """`{commit, dirty, branch}` of the repository holding `repo`; None values outside git."""
    repo = Path(repo)
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "branch": _git(repo, "rev-parse", "--abbrev-ref", "HEAD"),
    }


def dvc_revision(repo: str | Path = ".") -> dict[str, Any]:
    """`{dvc_lock_sha256, dvc_version}`: the pipeline state DVC recorded in `dvc.lock`."""
    lock = Path(repo) / "dvc.lock"
    try:
        from importlib.metadata import version

        dvc_version: str | None = version("dvc")
    except Exception:  # noqa: BLE001 - DVC is optional at run time
        dvc_version = None
    return {
        "dvc_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None,
        "dvc_version": dvc_version,
    }


def hardware() -> dict[str, Any]:
    """Machine description: OS, Python, torch, CPU count and accelerators (names only)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - torch missing or CUDA query failing is not fatal
        info["cuda"] = []
    return info


def utc_now() -> str:
    """ISO-8601 UTC timestamp with seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def collect(
    *,
    stage: str,
    params_digest: str,
    inputs: dict[str, Any],
    started_at: str,
    finished_at: str | None = None,
    repo: str | Path = ".",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The lineage record of one stage's artifact (JSON-serializable)."""
    return {
        "stage": stage,
        "inputs": inputs,
        "params_digest": params_digest,
        "git": git_revision(repo),
        "dvc": dvc_revision(repo),
        "hardware": hardware(),
        "started_at": started_at,
        "finished_at": finished_at or utc_now(),
        **(extra or {}),
    }


class Stopwatch:
    """Wall time of a block: `with Stopwatch() as sw: ...; sw.seconds`, plus its UTC start."""

    def __enter__(self) -> Self:
        self.started_at = utc_now()
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


LOCAL = "local:"  # prefix of a local path outside the repository, named by its last part


def portable_path(text: str, root: Path = PROJECT_ROOT) -> str:
    """An absolute local path (or file:// URI) as a repository-relative path (inside `root`) or
    `local:NAME`; anything else as it is."""
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    if not text.startswith("/") or "\n" in text:  # "~/..." stays: it names no one machine's folder
        return text
    path = Path(text)
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return f"{LOCAL}{path.name}"


def portable(value: Any, root: Path = PROJECT_ROOT) -> Any:
    """`value` (a JSON-like tree) with every absolute local path string made portable (`portable_path`)."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v, root) for v in value]
    if isinstance(value, Path):
        value = str(value)
    return portable_path(value, root) if isinstance(value, str) else value


def portable_yaml(text: str, root: Path = PROJECT_ROOT) -> str:
    """A resolved-config YAML text with its absolute local paths made portable (key order kept)."""
    return yaml.safe_dump(portable(yaml.safe_load(text), root), sort_keys=False)


def write_lineage(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write `lineage.json` (absolute local paths made portable) into an artifact folder."""
    path = Path(folder) / "lineage.json"
    path.write_text(json.dumps(portable(record), indent=2, sort_keys=True, default=str) + "\n")
    return path
