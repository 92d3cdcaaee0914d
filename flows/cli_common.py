"""What only the production `lcmlora` commands share: `--base` and its default, and the quieting of
the known harmless library output the CLI's entry point applies (components/cli/quiet.py, which
every flow run applies too). The options of DESIGN.md's CLI conventions, shared with the toy's
command line, live in components/cli/conventions.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from components.cli.conventions import print_config, resolve
from components.cli.quiet import quiet_known_noise
from components.config import Params

__all__ = ["BaseOpt", "pick_base", "quiet_known_noise", "stage_params"]  # quiet_known_noise: for flows/cli.py

BaseOpt = Annotated[str | None, typer.Option(
    "--base", help="base name in params.yaml, or a path / hub id (default: the only base in params)")]


def pick_base(cfg: Params, base: str | None) -> str:
    """`--base`, or the one base params defines; several bases need `--base NAME`."""
    if base is not None:
        return base
    if len(cfg.bases) == 1:
        return next(iter(cfg.bases))
    known = ", ".join(sorted(cfg.bases)) or "none"
    raise click.UsageError(f"--base is required: params defines {len(cfg.bases)} bases ({known})")


def stage_params(params: Path, overrides: list[str] | None, base: str | None, dry_run: bool,
                 extra: list[str] | None = None) -> tuple[Params, str] | None:
    """A stage command's resolved params and base name; None after printing them for `--dry-run`."""
    cfg = resolve(params, overrides, extra)
    name = pick_base(cfg, base)
    if dry_run:
        print_config(cfg)
        return None
    return cfg, name
