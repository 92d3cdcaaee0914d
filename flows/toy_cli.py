"""`lcmlora toy ...`: build the embedded toy world (source, classifier, base, style, style LoRA).

The CLI is the edge: it may import the toy package, which production code never does.
"""

from __future__ import annotations

from pathlib import Path

import click
import typer

from components.toy.config import toy_config
from flows.cli_common import DryRunOpt, OutputOpt, ParamsOpt, SetOpt, console, print_config, resolve
from flows.progress_view import ProgressView

toy_app = typer.Typer(help="Build the embedded toy world (source, base, style).", no_args_is_help=True)


@toy_app.command("source")
def toy_source(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
               output: OutputOpt = None) -> None:
    """Write the LAION/img2dataset-format toy source from sklearn's digits."""
    cfg = resolve(params, set_, [f"toy.source_dir={output}"] if output else None)
    if dry_run:
        print_config(cfg)
        return
    from components.toy.source import write_toy_source

    with console.status(f"writing the toy source to {toy_config(cfg).source_dir}"):
        summary = write_toy_source(toy_config(cfg).source_dir, seed=toy_config(cfg).seed)
    defects = ", ".join(f"{k} {v}" for k, v in summary["defects"].items())
    typer.echo(f"toy source: {summary['rows']} rows in {len(summary['shards'])} shards at "
               f"{toy_config(cfg).source_dir} (seed {toy_config(cfg).seed}); defects: {defects}")


@toy_app.command("classifier")
def toy_classifier(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
                   output: OutputOpt = None) -> None:
    """Train the digit classifier (toy metrics: prompt adherence, Frechet features) and save it."""
    cfg = resolve(params, set_, [f"toy.classifier_dir={output}"] if output else None)
    if dry_run:
        print_config(cfg)
        return
    import json
    import time

    import torch

    from components.toy.world import build_digit_classifier

    torch.set_num_threads(toy_config(cfg).threads)
    start = time.time()
    with ProgressView(console) as view:
        report = build_digit_classifier(toy_config(cfg), view)
    typer.echo(json.dumps({**report, "wall_s": round(time.time() - start, 1)}, indent=2))


@toy_app.command("base")
def toy_base(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
             output: OutputOpt = None) -> None:
    """Train the tiny SD-1.5-family toy base and save it in diffusers layout."""
    cfg = resolve(params, set_, [f"toy.base_dir={output}"] if output else None)
    if dry_run:
        print_config(cfg)
        return
    import json

    import torch

    from components.toy.world import build_toy_base

    torch.set_num_threads(toy_config(cfg).threads)
    with ProgressView(console) as view:
        report = build_toy_base(cfg, view)
    typer.echo(json.dumps(report, indent=2))
    guidance, accuracy = report["guidance_scale"], report["best_accuracy"]
    if accuracy < toy_config(cfg).min_accuracy:
        raise click.ClickException(f"toy base: prompted-digit accuracy {accuracy:.3f} at guidance {guidance} is below "
                                   f"toy.min_accuracy {toy_config(cfg).min_accuracy}; train longer (toy.train_steps) "
                                   f"or check {toy_config(cfg).base_dir}/training.json")


@toy_app.command("style")
def toy_style(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
              output: OutputOpt = None) -> None:
    """Write the toy style set: the same digits in a visibly different style."""
    cfg = resolve(params, set_, [f"toy.style_dir={output}"] if output else None)
    if dry_run:
        print_config(cfg)
        return
    from components.toy.style import write_toy_style

    folder = write_toy_style(toy_config(cfg).style_dir, toy_config(cfg).style_count, toy_config(cfg).seed)
    typer.echo(f"wrote {toy_config(cfg).style_count} toy-style images (png + txt, metadata.jsonl) to {folder}")


@toy_app.command("style-lora")
def toy_style_lora(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
                   output: OutputOpt = None) -> None:
    """Train a style LoRA on the toy style set (plain diffusion LoRA fine-tuning of the toy base)."""
    cfg = resolve(params, set_)
    if dry_run:
        print_config(cfg)
        return
    import json

    from components.toy.style_lora import run_toy_style_lora

    with ProgressView(console) as view:
        metrics = run_toy_style_lora(cfg, output, progress=view)
    typer.echo(json.dumps(metrics, indent=2))
