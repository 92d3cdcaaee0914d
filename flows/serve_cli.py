"""`lcmlora serve NAME@ALIAS --base REF`: the reference server (components/serve/server.py) under uvicorn.

flows/cli.py mounts it: `app.command("serve")(serve)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from components.cli.conventions import ParamsOpt, SetOpt


def serve(ref: Annotated[str, typer.Argument(help="NAME@ALIAS (watched), NAME:VERSION or NAME@sha256:HEX")],
          base: Annotated[str, typer.Option("--base", help="base: a folder, hub id or .safetensors")],
          host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
          port: int = typer.Option(8000, "--port", help="port to listen on"),
          poll_s: float = typer.Option(2.0, "--poll-s", help="seconds between reads of the alias"),
          fuse: bool = typer.Option(False, "--fuse", help="fuse the LoRA into the base weights "
                                    "(faster steps; docs/benchmarks.md); each version then loads into a fresh pipeline"),
          compile_unet: bool = typer.Option(False, "--compile", help="torch.compile the UNet (inductor); "
                                            "hot-swaps do not recompile it"),
          max_rank: int = typer.Option(64, "--max-rank", min=1, help="highest LoRA rank a hot-swap can take "
                                       "(the slot is padded to it)"),  # 64: components.serve.server.MAX_RANK
          params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None,
          dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and exit")) -> None:
    """Serve POST /generate (PNG), GET /healthz and GET /model; hot-swap the LoRA when the alias moves."""
    from components.config import load_params

    cfg = load_params(params, list(set_ or []))
    if dry_run:
        typer.echo(cfg.to_yaml())
        return
    import uvicorn

    from components.registry.manifest import RegistryError
    from components.registry.registry import Registry
    from components.serve.server import LoraSwapper, create_app
    from components.storage.storage import StorageError
    from flows.registry_cli import console

    registry = Registry.from_params(cfg)
    with console.status(f"loading base {base}"):
        from components.serve.pipeline_loader import load_base_pipeline

        pipe, family = load_base_pipeline(base)
    swapper = LoraSwapper(registry, ref, pipe, family, swap="reload" if fuse else "in-place", fuse=fuse,
                          max_rank=max_rank, compile_backend="inductor" if compile_unet else None,
                          poll_s=poll_s)
    try:
        swapper.start()
    except (RegistryError, StorageError) as exc:
        raise click.ClickException(str(exc)) from None
    status = swapper.status()
    console.print(f"serving {ref} = {status['name']}:{status['version']} ({status['digest']}) on "
                  f"http://{host}:{port}", markup=False, highlight=False)
    uvicorn.run(create_app(swapper), host=host, port=port, log_level="info")
