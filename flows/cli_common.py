"""What every `lcmlora` command shares: the options of DESIGN.md's CLI conventions, the resolved
params (`--params` + `--set`), `--dry-run` printing, and the stderr console progress is drawn on."""

from __future__ import annotations

import logging
import warnings
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


# Messages known to be harmless for lcmlora's use, dropped at the CLI edge only (the library
# never silences anything): logger name -> text the message contains.
KNOWN_NOISE: dict[str, str] = {
    # every LCM-LoRA load: it holds no text-encoder layers, by design (UNet-only LoRA)
    "diffusers.loaders.lora_base": "No LoRA keys associated to",
    "diffusers.loaders.peft": "No LoRA keys associated to",
    "diffusers.loaders.lora_pipeline": "No LoRA keys associated to",
    # the CPU torch build has no torchvision; the PIL image processors are used instead
    "transformers.utils.import_utils": "requires torchvision (not installed)",
}
KNOWN_WARNINGS = (  # warnings.warn messages (regex), same rule
    r"Adapter \S+ was active which is now deleted",  # merge evaluation deletes its temporary adapters
)


class _DropContaining(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_noise() -> None:
    """Drop the known harmless library messages above (called once by the CLI's entry point)."""
    for name, text in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropContaining) and f.text == text for f in logger.filters):
            logger.addFilter(_DropContaining(text))
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def echo_evaluation(doc: dict) -> None:
    """The metric table and the gate verdict on stdout."""
    from components.report import markdown_table, table_rows

    typer.echo(markdown_table(table_rows(doc)))
    gate = doc["gate"]
    typer.echo(f"gate: {'passed' if gate['passed'] else 'FAILED'}")
    for violation in gate["violations"]:
        typer.echo(f"  violation: {violation}")
    for key in gate.get("skipped", []):
        typer.echo(f"  skipped (off in params): {key}")
