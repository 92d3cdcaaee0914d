"""Naming of the Prefect artifacts the stage tasks create."""

from __future__ import annotations

import re


def artifact_key(prefix: str, name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"{prefix}-{name}".lower())).strip("-")
