"""What every `lcmlora` command shares: the options of DESIGN.md's CLI conventions, the resolved
params (`--params` + `--set`), `--dry-run` printing, and the stderr console progress is drawn on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from components.config import Params, load_params

console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file", show_default=True)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print the resolved config and exit")]
OutputOpt = Annotated[Path | None, typer.Option("--output", help="output folder")]
BaseOpt = Annotated[str | None, typer.Option(
    "--base", help="base name in params.yaml, or a path / hub id (default: the only base in params)")]


def resolve(params: Path, overrides: list[str] | None, extra: list[str] | None = None) -> Params:
    """Load params.yaml with the command's `--set` overrides, then its own flags on top."""
    return load_params(params, list(overrides or []) + list(extra or []))


def print_config(cfg: Params, *, as_json: bool = False) -> None:
    """`--dry-run`: the resolved config on stdout."""
    typer.echo(cfg.to_json() if as_json else cfg.to_yaml())


def pick_base(cfg: Params, base: str | None) -> str:
    """`--base`, or the one base params defines; several bases need `--base NAME`."""
    if base is not None:
        return base
    if len(cfg.bases) == 1:
        return next(iter(cfg.bases))
    known = ", ".join(sorted(cfg.bases)) or "none"
    raise click.UsageError(f"--base is required: params defines {len(cfg.bases)} bases ({known})")
