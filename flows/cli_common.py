"""What only the production `lcmlora` commands share: `--base` and its default, and the known
harmless library messages the CLI's entry point drops. The options of DESIGN.md's CLI
conventions, shared with the toy's command line, live in components/cli/conventions.py."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Annotated

import click
import typer

from components.cli.conventions import print_config, resolve
from components.config import Params

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
