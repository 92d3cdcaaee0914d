"""The `lcmlora` command line: one subcommand per stage of DESIGN.md.

Conventions for every command: `--params FILE` (default params.yaml), repeated
`--set section.key=value`, `--dry-run` prints the resolved config and exits, `--output DIR`
where a folder is produced. Heavy imports (torch, diffusers, prefect) happen inside the
command bodies so that `--help` stays fast. Any failure exits non-zero with the reason on
stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console

from components.config import ConfigError, Params, load_params

app = typer.Typer(
    name="lcmlora",
    help="Distill, evaluate, merge and publish LCM-LoRA acceleration vectors.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
toy_app = typer.Typer(help="Build the embedded toy world (source, base, style).", no_args_is_help=True)
registry_app = typer.Typer(help="Versioned LoRA registry: publish, list, show, pull, aliases, gc.", no_args_is_help=True)
alias_app = typer.Typer(help="Move and inspect aliases.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
app.add_typer(registry_app, name="registry")
registry_app.add_typer(alias_app, name="alias")

console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file", show_default=True)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override: section.key=value (repeatable)")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print the resolved config and exit")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", help="output folder")]
BaseOpt = Annotated[str, typer.Option("--base", help="base name in params.yaml, or a path / hub id")]


def resolve(params: Path, overrides: list[str] | None, extra: list[str] | None = None) -> Params:
    """Load params.yaml with the command's `--set` overrides, then its own flags on top."""
    return load_params(params, list(overrides or []) + list(extra or []))


def print_config(cfg: Params, *, as_json: bool = False) -> None:
    """`--dry-run`: the resolved config on stdout."""
    typer.echo(cfg.to_json() if as_json else cfg.to_yaml())


def not_built(stage: str) -> None:
    """A stage that is not built yet says so and fails."""
    raise click.ClickException(f"`lcmlora {stage}` is not built yet")


# --- toy world --------------------------------------------------------------------------


@toy_app.command("source")
def toy_source(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
               output: OutputOpt = None) -> None:
    """Write the LAION/img2dataset-format toy source from sklearn's digits."""
    cfg = resolve(params, set_, [f"toy.source_dir={output}"] if output else None)
    if dry_run:
        print_config(cfg)
        return
    from components.toy_source import write_toy_source

    with console.status(f"writing the toy source to {cfg.toy.source_dir}"):
        summary = write_toy_source(cfg.toy.source_dir, seed=cfg.toy.seed)
    defects = ", ".join(f"{k} {v}" for k, v in summary["defects"].items())
    typer.echo(f"toy source: {summary['rows']} rows in {len(summary['shards'])} shards at "
               f"{cfg.toy.source_dir} (seed {cfg.toy.seed}); defects: {defects}")


@toy_app.command("base")
def toy_base(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
             output: OutputOpt = None) -> None:
    """Train the tiny SD-1.5-family toy base and save it in diffusers layout."""
    not_built("toy base")


@toy_app.command("style")
def toy_style(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
              output: OutputOpt = None) -> None:
    """Write the toy style set: the same digits in a visibly different style."""
    not_built("toy style")


@toy_app.command("style-lora")
def toy_style_lora(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
                   output: OutputOpt = None) -> None:
    """Train a style LoRA on the toy style set."""
    not_built("toy style-lora")


# --- stages -----------------------------------------------------------------------------


@app.command()
def curate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
           output: OutputOpt = None) -> None:
    """Filter a LAION-style source into a curated manifest behind a GX gate."""
    not_built("curate")


@app.command()
def encode(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
           base: BaseOpt = "toy") -> None:
    """VAE-encode the curated manifest into latent webdataset shards."""
    not_built("encode")


@app.command()
def distill(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
            base: BaseOpt = "toy", output: OutputOpt = None) -> None:
    """Latent Consistency Distillation with LoRA (Algorithm 1) for one base."""
    not_built("distill")


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
             base: BaseOpt = "toy", output: OutputOpt = None) -> None:
    """Sampler matrix, metrics and gate for one LCM-LoRA."""
    not_built("evaluate")


@app.command()
def merge(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
          base: BaseOpt = "toy", output: OutputOpt = None) -> None:
    """Combine the LCM-LoRA with style LoRAs (theta_pre + l1 tau_style + l2 tau_LCM)."""
    not_built("merge")


@app.command()
def reproduce(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
              output: OutputOpt = None) -> None:
    """Run curate, encode, distill and evaluate on the toy world and print the table."""
    not_built("reproduce")


@app.command()
def nightly(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False) -> None:
    """The main job: every base in params through every stage, skipping unchanged work."""
    not_built("nightly")


@app.command("new-base")
def new_base(ref: str, params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
             dry_run: DryRunOpt = False) -> None:
    """Register a fine-tuned base and run distill, evaluate, merge and publish for it."""
    not_built("new-base")


# --- registry ---------------------------------------------------------------------------


@registry_app.command("publish")
def registry_publish(folder: Path, name: str = typer.Option(..., "--name"), params: ParamsOpt = Path("params.yaml"),
                     set_: SetOpt = None) -> None:
    """Publish a LoRA folder as a new immutable version."""
    not_built("registry publish")


# --- entry point ------------------------------------------------------------------------


def main() -> None:
    """Console entry point: run the app, turn any failure into one reason on stderr."""
    try:
        app(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        console.print("lcmlora: aborted")
        sys.exit(130)
    except click.ClickException as exc:
        console.print(f"lcmlora: {exc.format_message()}", markup=False, highlight=False)
        sys.exit(exc.exit_code or 1)
    except ConfigError as exc:
        console.print(f"lcmlora: config error: {exc}", markup=False, highlight=False)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: one line, non-zero
        console.print(f"lcmlora: {type(exc).__name__}: {exc}", markup=False, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
