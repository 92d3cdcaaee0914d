"""`lcmlora toy ...`: build the embedded toy world (source, classifier, base, style, style LoRA),
and the hard toy's bases (`toy base --hard [--sdxl]`, settings under params' `toy.hard`).

The toy world's command line, mounted by `flows/cli.py` through the entry-point group
`lcmlora.cli` (pyproject.toml: `toy`, `reproduce`), so no production module imports the toy
package; it shares DESIGN.md's CLI conventions through components/cli/conventions.py
(tests/test_import_graph.py checks both directions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import click
import typer

from components.cli.conventions import (
    DryRunOpt,
    OutputOpt,
    ParamsOpt,
    SetOpt,
    console,
    echo_evaluation,
    print_config,
    resolve,
)
from components.cli.progress_view import ProgressView
from components.config import Params
from components.toy.config import toy_config

toy_app = typer.Typer(help="Build the embedded toy world (source, base, style).", no_args_is_help=True)
HardOpt = Annotated[bool, typer.Option("--hard", help="the hard toy (two coloured digits, 64 px; settings under "
                                       "toy.hard); docs/toy-hard.md")]
SdxlOpt = Annotated[bool, typer.Option("--sdxl", help="with --hard: the SDXL-family hard base")]


def toy_params(params: Path, overrides: list[str] | None, dry_run: bool, output_key: str | None = None,
               output: Path | None = None, hard: bool = False) -> Params | None:
    """A toy command's resolved params (`--output` as `output_key`; with `hard`, `toy.hard` checked, so a
    typo there fails named, also with --dry-run); None after printing them for `--dry-run`."""
    cfg = resolve(params, overrides, [f"{output_key}={output}"] if output_key and output else None)
    if hard:
        from components.toy.hard.config import hard_toy_config

        hard_toy_config(cfg)
    if dry_run:
        print_config(cfg)
        return None
    return cfg


@toy_app.command("source")
def toy_source(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
               output: OutputOpt = None) -> None:
    """Write the LAION/img2dataset-format toy source from sklearn's digits."""
    if (cfg := toy_params(params, set_, dry_run, "toy.source_dir", output)) is None:
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
    if (cfg := toy_params(params, set_, dry_run, "toy.classifier_dir", output)) is None:
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
             output: OutputOpt = None, hard: HardOpt = False, sdxl: SdxlOpt = False) -> None:
    """Train the tiny SD-1.5-family toy base (or, with --hard, the hard toy's SD-1.5-family base; with --hard
    --sdxl its SDXL-family base, around the VAE of toy.hard.base_dir) and save it in diffusers layout."""
    if sdxl and not hard:
        raise click.UsageError("--sdxl builds the hard toy's SDXL-family base: pass --hard --sdxl")
    folder_key = ("toy.hard.sdxl_dir" if sdxl else "toy.hard.base_dir") if hard else "toy.base_dir"
    if (cfg := toy_params(params, set_, dry_run, folder_key, output, hard)) is None:
        return
    if hard:
        _hard_base(cfg, sdxl)
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


def _hard_base(cfg: Params, sdxl: bool) -> None:
    """`toy base --hard [--sdxl]`: the hard toy's builders with the `toy.hard` settings."""
    import json

    import torch

    from components.toy.hard.config import hard_toy_config
    from components.toy.hard.world import build_hard_base, build_hard_sdxl

    hard = hard_toy_config(cfg)
    if hard.device.startswith("cuda") and not torch.cuda.is_available():
        raise click.ClickException(f"toy.hard.device={hard.device}: torch sees no CUDA device here; "
                                   "set toy.hard.device=cpu (or run on a GPU machine)")
    torch.set_num_threads(hard.threads)
    with ProgressView(console) as view:
        report = (build_hard_sdxl if sdxl else build_hard_base)(hard, view)
    typer.echo(json.dumps(report, indent=2))


@toy_app.command("style")
def toy_style(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
              output: OutputOpt = None, hard: HardOpt = False) -> None:
    """Write the toy style set: the same digits in a visibly different style (with --hard, the hard toy's:
    64 px scenes, toy.hard.style_*)."""
    if (cfg := toy_params(params, set_, dry_run, f"toy.{'hard.' if hard else ''}style_dir", output)) is None:
        return
    if hard:
        from components.toy.hard.config import hard_toy_config
        from components.toy.hard.style import write_hard_style

        s = hard_toy_config(cfg)
        folder = write_hard_style(s.style_dir, s.style_count, s.style_seed, s.layout, s.style)
        typer.echo(f"wrote {s.style_count} {s.style} scenes ({s.layout} layout; png + txt, metadata.jsonl) to {folder}")
        return
    from components.toy.style import write_toy_style

    folder = write_toy_style(toy_config(cfg).style_dir, toy_config(cfg).style_count, toy_config(cfg).seed)
    typer.echo(f"wrote {toy_config(cfg).style_count} toy-style images (png + txt, metadata.jsonl) to {folder}")


@toy_app.command("style-lora")
def toy_style_lora(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
                   output: OutputOpt = None, hard: HardOpt = False, sdxl: SdxlOpt = False,
                   rescore: Annotated[bool, typer.Option("--rescore", help="with --hard: score the style LoRA "
                                                         "already in --output (default toy.hard.style_output) on "
                                                         "the hard base as it is now, without training")] = False,
                   ) -> None:
    """Train a style LoRA on the toy style set (plain diffusion LoRA fine-tuning of the toy base; with --hard, on
    the SD-1.5 hard base (toy.hard.base_dir) from the hard style set; --hard --sdxl: on the SDXL-family one)."""
    if sdxl and not hard:
        raise click.UsageError("toy style-lora --sdxl trains on the SDXL-family hard base: add --hard")
    if rescore and not hard:
        raise click.UsageError("toy style-lora --rescore scores the hard style LoRA: add --hard")
    if (cfg := toy_params(params, set_, dry_run, hard=hard)) is None:
        return
    import json

    from components.toy.hard.style_lora import rescore_hard_style_lora, run_hard_style_lora
    from components.toy.style_lora import run_toy_style_lora

    if rescore:
        typer.echo(json.dumps(rescore_hard_style_lora(cfg, output), indent=2))
        return
    with ProgressView(console) as view:
        if hard:
            metrics = run_hard_style_lora(cfg, output, progress=view, family="sdxl" if sdxl else "sd15")
        else:
            metrics = run_toy_style_lora(cfg, output, progress=view)
    typer.echo(json.dumps(metrics, indent=2))


def objective_runs(title: str, out: Path, recipe: list[str],
                   objectives: list[str]) -> list[tuple[str, Path, list[str]]]:
    """(title, folder, overrides) of each objective's run: one objective (or none: distill.objective) runs in
    `out` under `title`; with several, lcm's stays in `out` and another's goes to `out/OBJECTIVE`."""
    if len(objectives) < 2:
        return [(title, out, recipe + [f"distill.objective={o}" for o in objectives])]
    return [(f"{title}, {o}", out if o == "lcm" else out / o, recipe + [f"distill.objective={o}"])
            for o in objectives]


def reproduce(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
              output: OutputOpt = None,
              toy: Annotated[bool, typer.Option("--toy", help="reproduce on the embedded toy world")] = False,
              hard: HardOpt = False,
              family: Annotated[Literal["sd15", "sdxl", "both"], typer.Option(
                  "--family", help="hard toy bases: sd15, sdxl or both")] = "both",
              max_steps: Annotated[int | None, typer.Option("--max-steps", help="distillation steps")] = None,
              merge_claim: Annotated[bool, typer.Option("--merge", help="with --hard: then the merge claim on each "
                                                        "family's hard base (its style LoRA of toy.hard.style, merge "
                                                        "at 0.8, 1.0; the style-distill fallback where it loses the "
                                                        "style)")] = False,
              seeds: Annotated[str | None, typer.Option("--seeds", help="with --hard: the gate-margin check, one "
                                                        "distillation per seed (e.g. 0,1,2,3,4); each must pass the "
                                                        "gate")] = None,
              broken: Annotated[list[str] | None, typer.Option("--broken", help="with --hard: a deliberately broken "
                                                               "distillation (no-guidance, ten-steps) that must FAIL "
                                                               "the gate; repeatable")] = None,
              objectives: Annotated[str | None, typer.Option(
                  "--objectives", help="acceleration objectives distilled and evaluated side by side on the same "
                  "curated data and latents, e.g. lcm,pcm (default: lcm,pcm with --hard, distill.objective on the "
                  "easy toy); with more than one, OBJECTIVE's run lands in FAMILY/OBJECTIVE (lcm's in FAMILY)")] = None,
              ) -> None:
    """Run curate, encode, distill and evaluate on the toy world and print the table; exits non-zero
    when a reproduction goal (or, with --merge, the merge claim) is not met. Everything lands under --output (default runs/reproduce,
    runs/reproduce-hard/FAMILY with --hard)."""
    if not toy:
        raise click.UsageError("only the toy reproduction exists: pass --toy")
    if merge_claim and not hard:
        raise click.UsageError("--merge checks the merge claim on the hard bases: pass --hard")
    if (seeds or broken) and not hard:
        raise click.UsageError("--seeds / --broken check the hard toy's gate: pass --hard")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else []
    except ValueError:
        raise click.BadParameter(f"{seeds!r}: expected comma-separated integers, e.g. 0,1,2,3,4",
                                 param_hint="--seeds") from None
    chosen = [o.strip() for o in (objectives or ("lcm,pcm" if hard else "")).split(",") if o.strip()]
    if bad := [o for o in chosen if o not in ("lcm", "pcm")]:
        raise click.BadParameter(f"{', '.join(bad)}: expected lcm, pcm or both (lcm,pcm)", param_hint="--objectives")
    if merge_claim and chosen and "lcm" not in chosen:
        raise click.UsageError("--merge merges the base's LCM-LoRA: keep lcm in --objectives")
    import time

    from components.toy.reproduction import EASY_TOY, TOY_RECIPE, goals_markdown, run_reproduction

    runs = []  # (title, world, output folder, overrides, gate it must give: None = judge by the goals)
    if hard:
        from components.toy.hard.reproduction import FAMILIES, gate_runs, hard_overrides, hard_world

        for fam in (list(FAMILIES) if family == "both" else [family]):
            out = ((output or Path("runs/reproduce-hard")) / fam).resolve()
            recipe = hard_overrides(fam) + [f"storage.root={out / 'artifacts'}"]
            title = f"hard toy, {fam} family (bases.{FAMILIES[fam]})"
            try:
                checks = gate_runs(fam, seed_list, list(broken or []))
            except ValueError as err:
                raise click.BadParameter(str(err), param_hint="--broken") from None
            # every objective and gate-margin run shares the family's curated and encoded data (storage.root),
            # each in its own folder: lcm's where a single run lands (FAMILY), another objective's in FAMILY/OBJECTIVE
            for named, where, with_objective in objective_runs(title, out, recipe, chosen):
                if not checks:
                    runs.append((named, hard_world(fam), where, with_objective, None))
                runs += [(f"{named}, {run.label}", hard_world(fam), where / run.label,
                          with_objective + list(run.overrides), run.gate_must_pass) for run in checks]
    else:
        out = (output or Path("runs/reproduce")).resolve()
        runs += [(named, EASY_TOY, where, with_objective, None) for named, where, with_objective
                 in objective_runs("toy", out, TOY_RECIPE + [f"storage.root={out / 'artifacts'}"], chosen)]
    resolved = [(title, world, out, resolve(params, recipe + list(set_ or []),
                                            [f"distill.max_steps={max_steps}"] if max_steps is not None else []),
                 must_pass)
                for title, world, out, recipe, must_pass in runs]
    if dry_run:
        for title, _, _, cfg, _ in resolved:
            if len(resolved) > 1:
                typer.echo(f"# {title}")
            print_config(cfg)
        return

    unmet = []
    for title, world, out, cfg, must_pass in resolved:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        with ProgressView(console) as view:
            result = run_reproduction(world, cfg, out, progress=view)
        typer.echo(f"== {title}")
        echo_evaluation(result.evaluation_doc)
        if must_pass is None:  # a gate run evaluates the gate's rows only: the goals are not its question
            typer.echo("reproduction goals:")
            typer.echo(goals_markdown(result.goals))
        typer.echo(f"started {started}; seconds per stage: {result.seconds}")
        typer.echo(f"machine: {result.machine}")
        typer.echo(f"report: {result.paths['report.html']}  record: {result.paths['reproduction.json']}")
        gate = result.evaluation_doc["gate"]
        if must_pass is None:
            unmet += [f"{title}: {violation}" for violation in result.goals.violations]
        elif must_pass and not gate["passed"]:
            unmet.append(f"{title}: a good distillation FAILED the gate: {'; '.join(gate['violations'])}")
        elif not must_pass and gate["passed"]:
            unmet.append(f"{title}: a broken distillation PASSED the gate")
        if must_pass is not None:
            typer.echo(f"gate check: must {'pass' if must_pass else 'fail'}; "
                       f"{'passed' if gate['passed'] else 'failed: ' + '; '.join(gate['violations'])}")
        if merge_claim and must_pass is None and cfg.distill.objective == "lcm":
            from components.toy.hard.reproduction import run_merge_claim

            with ProgressView(console) as view:
                _, claim, variant = run_merge_claim(cfg, out / "lora", out / "merge", progress=view,
                                                    base_distill_seconds=result.seconds.get("distill"),
                                                    base_name=world.base_name)
            typer.echo("merge claim (issue 12, item 4):")
            typer.echo(goals_markdown(claim))
            unmet += [f"{title}: {violation}" for violation in claim.violations]
            if variant is not None:  # the merge lost the style: the style model's own LCM-LoRA (issue 28)
                from components.evaluate.gate import GateResult

                goals = GateResult(**variant["goals"])
                row = variant["row"]
                typer.echo(f"style-distilled variant (issue 28): style strength {row['style_strength']}, "
                           f"retention {row['style_retention']}, adherence {row['adherence']}, FD {row['fd']}; "
                           f"evaluation gate {'passed' if variant['gate']['passed'] else 'FAILED'}; "
                           f"seconds {variant['seconds']}; record {out / 'merge' / 'style_variant.json'}")
                typer.echo(goals_markdown(goals))
                unmet += [f"{title}: {violation}" for violation in goals.violations]
    if unmet:
        raise click.ClickException(f"{len(unmet)} reproduction goal(s) not met: " + "; ".join(unmet))
