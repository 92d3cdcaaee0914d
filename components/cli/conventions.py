"""DESIGN.md's CLI conventions, for every command line over the library (flows/cli.py and the
toy's components/toy/cli.py): the `--params` / `--set` / `--dry-run` / `--output` options, the
resolved params, `--dry-run` printing, the evaluation printout, and the stderr console progress
is drawn on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from components.config import Params, load_params

console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file", show_default=True)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print the resolved config and exit")]
OutputOpt = Annotated[Path | None, typer.Option("--output", help="output folder")]


def resolve(params: Path, overrides: list[str] | None, extra: list[str] | None = None) -> Params:
    """Load params.yaml with the command's `--set` overrides, then its own flags on top."""
    return load_params(params, list(overrides or []) + list(extra or []))


def print_config(cfg: Params, *, as_json: bool = False) -> None:
    """`--dry-run`: the resolved config on stdout."""
    typer.echo(cfg.to_json() if as_json else cfg.to_yaml())


def echo_evaluation(doc: dict) -> None:
    """The metric table and the gate verdict on stdout."""
    from components.evaluate.report import markdown_table, table_rows

    typer.echo(markdown_table(table_rows(doc)))
    gate = doc["gate"]
    typer.echo(f"gate: {'passed' if gate['passed'] else 'FAILED'}")
    for violation in gate["violations"]:
        typer.echo(f"  violation: {violation}")
    for key in gate.get("skipped", []):
        typer.echo(f"  skipped (off in params): {key}")
