"""Where the project lives, and relative paths that fall back to it.

Committed data (`data/prompts/`, `data/toy/...`) is named relative to the repository root in
params.yaml; a command run from another working directory still finds it.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def project_path(path: str | Path) -> Path:
    """A relative path that does not exist from the working directory falls back to the project root."""
    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        return PROJECT_ROOT / path
    return path
