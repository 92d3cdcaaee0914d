"""Lint is part of the suite: `ruff check` over the whole repository must report nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

from components.executables import venv_executable

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean() -> None:
    ruff = venv_executable("ruff")
    assert ruff is not None, "ruff not found: install the dev extra (pip install -e '.[dev]')"
    done = subprocess.run([ruff, "check", "--no-cache", str(REPO)], capture_output=True, text=True,
                          cwd=REPO, timeout=300, check=False)
    assert done.returncode == 0, f"ruff check found problems:\n{done.stdout}{done.stderr}"
