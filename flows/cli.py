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
from typing import Annotated, Any

import click
import typer

from components.cli import conventions
from components.cli.conventions import DryRunOpt, OutputOpt, ParamsOpt, SetOpt, console
from components.cli.progress_view import ProgressView
from components.config import ConfigError
from flows.cli_common import BaseOpt, pick_base, quiet_known_noise, stage_params
from flows.registry_cli import registry_app
from flows.serve_cli import serve

app = typer.Typer(
    name="lcmlora",
    help="Distill, evaluate, merge and publish LCM-LoRA acceleration vectors.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(registry_app, name="registry")
app.command("serve")(serve)

# --- stages -----------------------------------------------------------------------------


@app.command()
def curate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
           output: OutputOpt = None, base: BaseOpt = None) -> None:
    """Filter a LAION-style source into a curated manifest behind a GX gate.

    Writes to storage.root/stages/curate/KEY (the folder the flows use; reused when already there)
    unless --output names a folder."""
    if (run := stage_params(params, set_, base, dry_run)) is None:
        return
    cfg, name = run
    from components.models.base_model import resolve_base
    from components.stages.curate import curate_stage
    from components.stages.inputs import source_storage
    from components.storage.storage import Storage

    _, base_cfg = resolve_base(cfg, name)  # its resolution only: curation loads no model
    storage = source_storage(str(output), cfg.storage) if output else Storage.from_config(cfg.storage)
    with ProgressView(console) as view:
        result = curate_stage(cfg, storage, min_side=base_cfg.resolution, output="" if output else None,
                              progress=view)
    where = storage.url(result.folder)
    if result.reused:
        typer.echo(f"curate: unchanged source and curate section: reused {result.kept} of {result.rows_in} rows "
                   f"-> {where}/manifest.parquet (sha256 {result.manifest_hash[:16]})")
        return
    reasons = ", ".join(f"{k} {v}" for k, v in result.rejected.items()) or "none"
    typer.echo(f"curated {result.kept} of {result.rows_in} rows -> {where}/manifest.parquet "
               f"(sha256 {result.manifest_hash[:16]}); rejected: {reasons}; GX data docs: {where}/gx/index.html")


@app.command()
def synthesize(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
               output: OutputOpt = None, base: BaseOpt = None,
               style: Annotated[Path | None, typer.Option("--style", help="style LoRA fused into the base before "
                                                         "sampling (synthesize.style)")] = None,
               style_weight: Annotated[float | None, typer.Option("--style-weight", help="its weight l1 "
                                                                  "(synthesize.style_weight)")] = None) -> None:
    """Sample a model's own images (DPM-Solver++, the base's CFG) as a LAION/img2dataset source.

    Prompts are synthesize.prompts or the curated manifest's captions. Writes to
    storage.root/stages/synthesize/BASE/KEY (reused when complete, resumed when a run was killed)
    unless --output names a folder; point curate.source at it to curate, encode and distill on it."""
    extra = [f"synthesize.style={style}"] if style is not None else []
    extra += [f"synthesize.style_weight={style_weight}"] if style_weight is not None else []
    if (run := stage_params(params, set_, base, dry_run, extra)) is None:
        return
    cfg, name = run
    from components.models.base_model import resolved_base
    from components.stages.inputs import source_storage
    from components.stages.synthesize import synthesis_prompts, synthesize_stage
    from components.storage.storage import Storage

    storage, resolved = Storage.from_config(cfg.storage), resolved_base(cfg, name)
    # --output is a folder of its own: the captions still come from the manifest in storage.root
    target, prompts = (source_storage(str(output), cfg.storage), synthesis_prompts(cfg, storage, resolved)) \
        if output else (storage, None)
    with ProgressView(console) as view:
        out = synthesize_stage(cfg, resolved, target, prompts=prompts, output="" if output else None, progress=view)
    where = target.url(out.source)
    what = "unchanged: reused" if out.reused else f"sampled {out.sampled_batches} of {out.shards} batch(es) in " \
        f"{out.seconds:.0f}s;"
    typer.echo(f"synthesize --base {name}: {what} {out.count} images -> {where} ({out.key}); "
               f"curate it with --set curate.source={where}")


ManifestOpt = Annotated[str | None, typer.Option(
    "--manifest", help="curated manifest, relative to storage.root (default: the curate stage's for these params, "
    "stages/curate/KEY/manifest.parquet)")]


@app.command()
def encode(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
           base: BaseOpt = None, manifest: ManifestOpt = None) -> None:
    """VAE-encode the curated manifest into latent webdataset shards (runs under `accelerate launch`)."""
    if (run := stage_params(params, set_, base, dry_run)) is None:
        return
    cfg, name = run
    from components.models.base_model import resolved_base
    from components.stages.encode import encode_stage
    from components.storage.storage import Storage

    rank, world, barrier = launched_rank(cfg.encode.device)
    resolved = resolved_base(cfg, name, vae_only=not cfg.encode.text_embeddings)  # encoding needs no UNet
    with ProgressView(console, live=None if rank == 0 else False) as view:
        result = encode_stage(cfg, resolved, Storage.from_config(cfg.storage), manifest=manifest, rank=rank,
                              world_size=world, barrier=barrier, progress=view if rank == 0 else None)
    if rank == 0:
        what = "reused" if result.reused else f"encoded {result.encoded_shards} new shard(s) of {result.shards}"
        typer.echo(f"encode --base {name}: {result.samples} samples, {what}, "
                   f"{result.rejected} rejected -> {cfg.storage.root}/{result.index} (pointer {result.pointer})")


def launched_rank(device: str) -> tuple[int, int, Any]:
    """(rank, world size, barrier) under `accelerate launch` / torchrun, else (0, 1, None)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return state.process_index, state.num_processes, state.wait_for_everyone


@app.command()
def distill(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
            base: BaseOpt = None, output: OutputOpt = None,
            max_steps: Annotated[int | None, typer.Option("--max-steps", help="optimizer steps (distill.max_steps)")] = None,
            latents: Annotated[str | None, typer.Option("--latents", help="shard index.json, relative to storage.root "
                                                        "(default: the one the base's encode pointer names)")] = None,
            restart: Annotated[bool, typer.Option("--restart", help="start at step 0: remove the run folder's "
                                                  "checkpoints (by default a rerun resumes from the latest)")] = False,
            resume: Annotated[str | None, typer.Option("--resume", help="a checkpoint folder to resume from "
                                                       "('latest': the newest; the default when one exists)")] = None,
            as_json: Annotated[bool, typer.Option("--json", help="with --dry-run: print JSON")] = False) -> None:
    """Latent Consistency Distillation with LoRA (Algorithm 1) for one base.

    Trains into storage.root/stages/distill/BASE/KEY (the folder the flows use) unless --output
    names a folder, on the shards the base's encode pointer names. A rerun after a crash resumes
    from the run folder's latest checkpoint; --restart starts over."""
    cfg = conventions.resolve(params, set_, [f"distill.max_steps={max_steps}"] if max_steps is not None else [])
    name = pick_base(cfg, base)
    if dry_run:
        print_distill_plan(cfg, name, as_json)
        return
    if restart and resume:
        raise click.UsageError("--restart starts over; --resume continues: pass one of them")
    from components.models.base_model import resolved_base
    from components.stages.distill import distill_stage
    from components.storage.storage import Storage

    storage = Storage.from_config(cfg.storage)
    with ProgressView(console) as view:
        out = distill_stage(cfg, resolved_base(cfg, name), storage, index=latents, output=output, restart=restart,
                            resume=resume, progress=view)
    if out.reused:
        typer.echo(f"distill --base {name}: unchanged: the LoRA of this config is at {storage.url(out.rel)} "
                   "(--restart trains it again)")
    elif out.main_process:
        if out.note:
            typer.echo(out.note)
        m = out.metrics
        typer.echo(f"distilled {m['steps']} steps in {m['seconds']:.0f}s, final loss "
                   f"{m['final_loss_mean20']:.4g}; LoRA ({m['lora_trainable_params']:,} params) in "
                   f"{storage.url(out.rel) if out.rel else out.folder}")


def print_distill_plan(cfg: Any, name: str, as_json: bool) -> None:
    """`distill --dry-run`: the resolved config and the LoRA's size on the meta-device UNet (no weights)."""
    import json

    from components.models.base_model import resolve_base
    from components.stages.distill import dry_run

    base_name, base_cfg = resolve_base(cfg, name)
    summary = dry_run(cfg.distill, base_name=base_name, base=base_cfg)
    if as_json:
        typer.echo(json.dumps({"config": json.loads(cfg.to_json()), **summary}, indent=2))
        return
    conventions.print_config(cfg)
    typer.echo(f"base: {summary['base_name']} ({summary['base']['family']}, UNet config {summary['unet_config']})")
    typer.echo(f"lora_trainable_params: {summary['lora_trainable_params']:,}")


LoraOpt = Annotated[Path | None, typer.Option("--lora", help="LoRA artifact folder (default: the distill stage's "
                                              "for these params, stages/distill/BASE/KEY)")]


@app.command()
def evaluate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
             base: BaseOpt = None, output: OutputOpt = None, lora: LoraOpt = None) -> None:
    """Sampler matrix, metrics and gate for one LCM-LoRA; exits non-zero when the gate fails.

    Judges a copy of the LoRA in OUTPUT/lora (the folder publish ships); OUTPUT defaults to
    storage.root/stages/evaluate/BASE/KEY, the folder the flows use."""
    if (run := stage_params(params, set_, base, dry_run)) is None:
        return
    cfg, name = run
    from components.lora.io import lora_file
    from components.models.base_model import resolved_base
    from components.stages.evaluate import evaluate_stage
    from components.storage.storage import Storage

    if lora is not None:
        lora_file(lora)  # a corrupt --lora fails, named, before the base loads to be fingerprinted
    storage = Storage.from_config(cfg.storage)
    with ProgressView(console) as view:
        out = evaluate_stage(cfg, resolved_base(cfg, name), storage, lora=lora, output=output, progress=view)
    evaluation = out.evaluation
    conventions.echo_evaluation(evaluation.doc)
    typer.echo(f"report: {evaluation.paths['report.html']}  metrics: {evaluation.paths['metrics.json']}  "
               f"evaluated LoRA: {storage.url(out.rel) + '/lora' if out.rel else out.lora_folder}")
    if not evaluation.passed:
        raise click.ClickException(f"evaluation gate failed with {len(evaluation.violations)} violation(s): "
                                   + "; ".join(evaluation.violations))


@app.command()
def merge(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
          base: BaseOpt = None, output: OutputOpt = None,
          lcm: Annotated[Path | None, typer.Option("--lcm", help="LCM-LoRA folder (default: the distill stage's for "
                                                   "these params, stages/distill/BASE/KEY)")] = None,
          style: Annotated[Path | None, typer.Option("--style", help="style LoRA .safetensors (default merge.style_file)")] = None,
          weights: Annotated[str | None, typer.Option("--weights", help="one l1,l2 pair instead of the merge.weights grid")] = None) -> None:
    """Combine the LCM-LoRA with style LoRAs (theta_pre + l1 tau_style + l2 tau_LCM).

    Writes to storage.root/stages/merge/BASE/KEY (the folder the flows use) unless --output names one."""
    extra = []
    if weights:
        try:
            l1, l2 = (float(x) for x in weights.split(","))
        except ValueError:
            raise click.BadParameter(f"--weights {weights!r}: expected two numbers l1,l2 (e.g. 0.8,1.0)") from None
        extra.append(f"merge.weights=[[{l1}, {l2}]]")
    if (run := stage_params(params, set_, base, dry_run, extra)) is None:
        return
    cfg, name = run
    from components.evaluate.merge_eval import markdown_table
    from components.models.base_model import resolved_base
    from components.stages.merge import merge_stage
    from components.storage.storage import Storage

    storage = Storage.from_config(cfg.storage)
    with ProgressView(console) as view:
        out = merge_stage(cfg, resolved_base(cfg, name), storage, lcm=lcm, style=style, output=output,
                          progress=view)
    result = out.merge
    typer.echo(markdown_table(result.doc["rows"]))
    typer.echo(f"report: {result.paths['report.md']}  variants: {storage.url(out.rel) if out.rel else result.output}")
    selection = result.selection
    if not selection["passed"]:
        raise click.ClickException(f"no (l1, l2) passes the merge rule: {'; '.join(selection['violations'])}")
    typer.echo(f"selected: {selection['best']['label']}")


@app.command()
def nightly(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False) -> None:
    """The main job: every base in params through every stage, skipping unchanged work."""
    cfg = conventions.resolve(params, set_)
    if dry_run:
        conventions.print_config(cfg)
        return
    from components.preflight import preflight
    from flows.runtime import prefect_environment

    preflight(cfg)  # every base, every stage: fails in seconds, before the flow starts
    typer.echo(prefect_environment())
    from components.run_summary import summary_lines
    from flows.nightly import BasesFailed
    from flows.nightly import nightly as nightly_flow
    from tasks.progress import showing

    with ProgressView(console) as view, showing(view):  # the flow runs here: its tasks report to the view
        state = nightly_flow(str(params), list(set_ or []), return_state=True)
    result = state.result(raise_on_failure=False)
    summary = result.summary if isinstance(result, BasesFailed) else result if isinstance(result, dict) else None
    if summary is not None:
        typer.echo("\n".join(summary_lines(summary)))
    if not state.is_completed():
        raise click.ClickException(f"nightly failed: {result}")


@app.command("new-base")
def new_base(ref: str, name: Annotated[str | None, typer.Option("--name", help="base name (default: from REF)")] = None,
             family: Annotated[str | None, typer.Option("--family", help="sd15 or sdxl (default: detected)")] = None,
             params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, dry_run: DryRunOpt = False,
             emit: Annotated[bool, typer.Option("--emit", help="only emit lcmlora.base.registered to the Prefect "
                                                "server; its new-base deployment runs the base")] = False) -> None:
    """Register a fine-tuned base and run distill, evaluate, merge and publish for it."""
    cfg = conventions.resolve(params, set_)
    if dry_run:
        from flows.new_base import register_config

        base_name, base_cfg = register_config(cfg, ref, name, family)
        conventions.print_config(cfg.model_copy(update={"bases": {base_name: base_cfg}}))
        if base_name not in cfg.bases:
            console.print(f"note: {base_name} takes resolution, guidance and prediction type from the params base "
                          "that shares its VAE (found when the run fingerprints it); the values above apply otherwise",
                          markup=False, highlight=False)
        return
    from components.preflight import preflight
    from flows.new_base import register_config
    from flows.runtime import has_configured_server, prefect_environment

    if emit:
        if not has_configured_server():
            raise click.ClickException("--emit needs a Prefect server: set PREFECT_API_URL (docs/orchestration.md)")
        from flows.events import BASE_REGISTERED, emit_base_registered

        typer.echo(f"emitted {BASE_REGISTERED} for {ref} (event {emit_base_registered(ref, name)})")
        return
    base_name, base_cfg = register_config(cfg, ref, name, family)
    if ref in cfg.bases:  # else its judges come from the parent it shares a VAE with: the flow checks
        preflight(cfg, {base_name: base_cfg})
    typer.echo(prefect_environment())
    from components.run_summary import summary_lines
    from flows.new_base import new_base as new_base_flow
    from tasks.progress import showing

    with ProgressView(console) as view, showing(view):
        state = new_base_flow(ref, name=name, family=family, params_file=str(params), overrides=list(set_ or []),
                              return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, dict):
        typer.echo("\n".join(summary_lines(result)))
    if not state.is_completed():
        raise click.ClickException(f"new-base failed: {result}")


# --- entry point ------------------------------------------------------------------------


def add_plugin_commands(target: typer.Typer) -> None:
    """Mount the commands other packages register under the entry-point group `lcmlora.cli`
    (a Typer app mounts as a command group, a function as a command; the toy world registers
    `toy` and `reproduce` so this module never imports it)."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group="lcmlora.cli"), key=lambda e: e.name):
        obj = ep.load()
        if isinstance(obj, typer.Typer):
            target.add_typer(obj, name=ep.name)
        else:
            target.command(ep.name)(obj)


add_plugin_commands(app)


def main() -> None:
    """Console entry point: run the app, turn any failure into one reason on stderr."""
    quiet_known_noise()
    try:
        app(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        console.print("lcmlora: aborted")
        sys.exit(130)
    except click.ClickException as exc:
        console.print(f"lcmlora: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code or 1)
    except ConfigError as exc:
        console.print(f"lcmlora: config error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: one line, non-zero
        console.print(f"lcmlora: {type(exc).__name__}: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
