"""Find a command-line tool that a Python package installed: beside this interpreter first."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def venv_executable(name: str) -> str | None:
    """`name` in this Python's bin folder (the project venv), else on PATH, else None."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    return shutil.which(name)
