"""Plug-ins found by name among the installed Python entry points (pyproject.toml
`[project.entry-points."lcmlora.*"]`): how production reaches code it does not import, such as
the toy world's judges (`lcmlora.judges`) and its source writer (`lcmlora.sources`)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from components.config import ConfigError


def installed(group: str) -> list[str]:
    """Names of the installed entry points of `group`, sorted."""
    return sorted(ep.name for ep in entry_points(group=group))


def load_plugin(group: str, name: str, params_key: str) -> Any:
    """The object entry point `name` of `group` points at; unknown names raise naming the key."""
    found = entry_points(group=group, name=name)
    if not found:
        names = ", ".join(installed(group)) or "none; reinstall the project (pip install -e .)"
        raise ConfigError(f"{params_key}={name!r}: no entry point of that name in group {group} "
                          f"(installed: {names})")
    return next(iter(found)).load()
