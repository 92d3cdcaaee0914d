"""`lcmlora registry ...`: publish, list, show, pull, push-hub, alias set/rollback/history, gc.

A typer app mounted by flows/cli.py (`app.add_typer(registry_app, name="registry")`). Every
command takes `--params FILE` and `--set section.key=value`; registry and storage failures
are one-line errors (exit 1).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import click
import typer

from components.cli.conventions import ParamsOpt, SetOpt, console

registry_app = typer.Typer(help="Versioned LoRA registry: publish, list, show, pull, aliases, gc.",
                           no_args_is_help=True)
alias_app = typer.Typer(help="Move, roll back and inspect aliases.", no_args_is_help=True)
registry_app.add_typer(alias_app, name="alias")
ForceOpt = Annotated[bool, typer.Option("--force", help="override a gate that did not pass (needs --reason)")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="why: recorded in the alias history")]


def _registry(params: Path, set_: list[str] | None):
    """The Registry of params.registry.root (endpoint and retries from params.storage)."""
    from components.config import load_params
    from components.registry.registry import Registry

    return Registry.from_params(load_params(params, list(set_ or [])))


def _force_reason(force: bool, reason: str | None) -> str | None:
    if force and not (reason or "").strip():
        raise click.ClickException("--force needs --reason \"...\": the reason is recorded in the alias history")
    if reason and not force:
        raise click.ClickException("--reason is recorded only with --force (or `alias rollback`)")
    return reason if force else None


@contextlib.contextmanager
def _registry_errors() -> Iterator[None]:
    """Registry and storage failures become one-line CLI errors."""
    from components.registry.manifest import RegistryError
    from components.storage.storage import StorageError

    try:
        yield
    except (RegistryError, StorageError) as exc:
        raise click.ClickException(str(exc)) from None


@contextlib.contextmanager
def _bytes_bar(description: str, total: int) -> Iterator[Callable[[str, int], None]]:
    """A rich bytes bar for publish/pull; yields the registry's per-file progress callback."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda rel, size: bar.update(task, advance=size)


@registry_app.command("publish")
def registry_publish(folder: Path, name: str = typer.Option(..., "--name", help="registry name"),
                     alias: str | None = typer.Option(None, "--alias", help="alias to move to the new version"),
                     force: ForceOpt = False, reason: ReasonOpt = None,
                     params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
                     dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit"),
                     ) -> None:
    """Publish a LoRA folder as a new immutable version (identical content: the existing one)."""
    from components.config import load_params

    cfg = load_params(params, list(set_ or []))
    if dry_run:
        typer.echo(cfg.to_yaml())
        return
    from components.registry.registry import Registry
    from components.stages.publish import run_publish

    force_reason = _force_reason(force, reason)
    with _registry_errors():
        reg = Registry.from_params(cfg)
        total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
        with _bytes_bar(f"publish {name}", total) as progress:
            out = run_publish(cfg.publish.model_copy(update={"alias": alias or cfg.publish.alias}), registry=reg,
                              folder=folder, name=name, registry_root=cfg.registry.root, move_alias=alias is not None,
                              force_reason=force_reason, progress=progress)
    m = out.manifest
    extra = f", alias {alias}" if alias else ""
    gate = "" if m.gate_status == "passed" else f", gate {m.gate_status}"
    if out.existing:
        typer.echo(f"already published: {m.name}:{m.version} has identical content ({m.digest}); no new version"
                   f"{extra}")
    else:
        typer.echo(f"published {m.name}:{m.version} ({len(m.files)} files, {m.total_size / 1e6:.1f} MB{gate}"
                   f"{extra}) to {reg.storage.url()}")
    typer.echo(f"digest {m.name}@{m.digest}")


@registry_app.command("list")
def registry_list(name: str | None = typer.Argument(None, help="list this name's versions"),
                  params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Registered names, or every version of NAME: digest, created, size, gate, aliases.

    A version whose manifest cannot be read or was edited is listed as BROKEN with the reason;
    the others are listed as usual.
    """
    with _registry_errors():
        reg = _registry(params, set_)
        if name is None:
            for n in reg.list():
                typer.echo(n)
            return
        by_version: dict[str, list[str]] = {}
        for alias, version in sorted(reg.aliases(name).items()):
            by_version.setdefault(version, []).append(alias)
        for status in reg.versions(name):
            aliases = ",".join(by_version.get(status.version, []))
            m = status.manifest
            if m is None:
                typer.echo(f"{name}:{status.version}\tBROKEN\t{status.error}\t{aliases}")
                continue
            typer.echo(f"{name}:{status.version}\t{m.digest[:19]}\t{m.created_at}\t{m.total_size / 1e6:.1f} MB\t"
                       f"gate {m.gate_status}\t{aliases}")


@registry_app.command("show")
def registry_show(ref: str, params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """The manifest of REF (NAME@ALIAS, NAME:VERSION, NAME@sha256:HEX or NAME) as JSON, with its aliases."""
    with _registry_errors():
        reg = _registry(params, set_)
        manifest = reg.show(ref)
        aliases = sorted(a for a, v in reg.aliases(manifest.name).items() if v == manifest.version)
    body = json.loads(manifest.to_json())
    body["aliases"] = aliases
    typer.echo(json.dumps(body, indent=2))


@registry_app.command("pull")
def registry_pull(ref: str, to: Annotated[Path, typer.Option("--to", help="folder to write (must be new or empty)")],
                  overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing folder"),
                  params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Download and verify REF into a folder, atomically, through the local cache."""
    with _registry_errors():
        reg = _registry(params, set_)
        with _bytes_bar(f"pull {ref}", reg.show(ref).total_size) as progress:
            result = reg.pull(ref, to, overwrite=overwrite, progress=progress)
    m = result.manifest
    typer.echo(f"pulled {m.name}:{m.version} ({m.digest}) to {result.path} ({len(result.downloaded)} files "
               f"downloaded, {len(result.cached)} from cache, all verified)")


@registry_app.command("push-hub")
def registry_push_hub(ref: str, repo_id: str,
                      private: bool = typer.Option(False, "--private", help="create the Hub repository private"),
                      dry_run: bool = typer.Option(False, "--dry-run", help="list what would be uploaded and exit"),
                      params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Upload REF (NAME@ALIAS, NAME:VERSION, ...) to the Hugging Face Hub as model repository REPO_ID.

    The version is pulled (verified) into a temporary folder, its card checked for the Hub's
    fields, then uploaded with `HfApi().upload_folder` (token: `hf auth login` or $HF_TOKEN).
    """
    import tempfile

    from components.registry.hub_push import hub_upload_plan, push_to_hub

    with _registry_errors(), tempfile.TemporaryDirectory(prefix="lcmlora-hub-") as tmp:
        reg = _registry(params, set_)
        pulled = reg.pull(ref, Path(tmp) / "version")
        m = pulled.manifest
        plan = hub_upload_plan(pulled.path)
        if dry_run:
            typer.echo(f"would upload {m.name}:{m.version} ({m.digest}) to https://huggingface.co/{repo_id}:")
            for rel in plan.files:
                typer.echo(f"  {rel}")
            return
        from huggingface_hub import HfApi

        url = push_to_hub(plan, repo_id, HfApi(), private=private,
                          message=f"lcmlora {m.name}:{m.version} ({m.digest})")
    typer.echo(f"uploaded {m.name}:{m.version} ({len(plan.files)} files) to https://huggingface.co/{repo_id}: {url}")


@alias_app.command("set")
def registry_alias_set(name: str, alias: str, version: str, force: ForceOpt = False, reason: ReasonOpt = None,
                       params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Point ALIAS of NAME at VERSION (compare-and-swap, recorded in its history).

    Refused when VERSION's gate failed (the failed rules are named) or is missing;
    `--force --reason "..."` overrides and records the reason.
    """
    force_reason = _force_reason(force, reason)
    with _registry_errors():
        move = _registry(params, set_).alias_set(name, alias, version, force_reason=force_reason)
    forced = f" (forced: {move.reason})" if move.reason else ""
    typer.echo(f"{name}@{alias}: {move.previous or '(new)'} -> {move.version}{forced}")


@alias_app.command("rollback")
def registry_alias_rollback(name: str, alias: str, reason: ReasonOpt = None,
                            params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Move ALIAS back to the version it pointed to before (compare-and-swap)."""
    with _registry_errors():
        move = _registry(params, set_).alias_rollback(name, alias, reason=reason)
    typer.echo(f"{name}@{alias}: rolled back {move.previous} -> {move.version}")


@alias_app.command("history")
def registry_alias_history(name: str, alias: str, params: ParamsOpt = Path("params.yaml"),
                           set_: SetOpt = None) -> None:
    """Every move of ALIAS, oldest first (kind, and the reason of forced moves and rollbacks)."""
    with _registry_errors():
        moves = _registry(params, set_).alias_history(name, alias)
    for move in moves:
        why = f"\t{move.reason}" if move.reason else ""
        typer.echo(f"{move.updated_at}\t{move.previous or '(new)'} -> {move.version}\t{move.kind}{why}")


@registry_app.command("gc")
def registry_gc(name: str, keep: int = typer.Option(..., "--keep", help="newest versions to keep"),
                yes: bool = typer.Option(False, "--yes", help="delete (the default is a dry run)"),
                grace_hours: float = typer.Option(1.0, "--grace-hours",
                                                  help="age after which an unfinished publish is abandoned"),
                params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Delete all but the newest N versions of NAME (aliased ones are kept), and what dead
    publishers left: abandoned claims, their files, incomplete multipart uploads."""
    with _registry_errors():
        plan = _registry(params, set_).gc(name, keep, dry_run=not yes, grace_s=grace_hours * 3600)
    verb = "would delete" if plan.dry_run else "deleted"
    typer.echo(f"{name}: {verb} {', '.join(plan.delete) or 'nothing'}; keeping {', '.join(plan.keep) or 'nothing'}")
    for version, aliases in sorted(plan.aliased.items(), key=lambda kv: int(kv[0])):
        typer.echo(f"  {version} kept: aliased by {', '.join(aliases)}")
    if plan.incomplete:
        typer.echo(f"  {verb} abandoned claims and their files: {', '.join(plan.incomplete)}")
    if plan.uploads:
        typer.echo(f"  {'would abort' if plan.dry_run else 'aborted'} incomplete multipart uploads: "
                   f"{', '.join(plan.uploads)}")
    if plan.dry_run:
        typer.echo("dry run: pass --yes to delete")
