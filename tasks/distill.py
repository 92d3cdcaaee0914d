"""Prefect task of the distill stage: LCD-LoRA training with a live progress artifact.

The stage is one call (`distill_stage`). In-process by default; with `orchestrate.accelerate_config`
naming a config of more than one process (infra/accelerate/), the stage's training step runs
`accelerate launch ... -m flows.cli distill` with the resolved params written beside the run,
and the task follows progress through the newest checkpoint rank 0 wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from components.config import Params
from components.models.base_model import ResolvedBase
from components.progress import Progress, ProgressFn
from components.stages.distill import distill_stage
from components.storage.storage import Storage
from tasks.artifacts import artifact_key
from tasks.caching import key_parameter
from tasks.progress import task_progress


def accelerate_processes(config_file: str | None, gpus: int | None = None) -> int:
    """Processes an accelerate config launches (1 without a config).

    A one-machine multi-GPU config launches one process per GPU this machine (pod) sees: its
    `num_processes` is used only where no GPU is visible (gloo on CPU). `gpus`: the count to
    assume instead of torch.cuda.device_count().
    """
    if not config_file:
        return 1
    from accelerate.commands.config.config_args import load_config_from_file

    if not Path(config_file).is_file():
        raise FileNotFoundError(f"orchestrate.accelerate_config: {config_file} not found (see infra/accelerate/)")
    cfg = load_config_from_file(config_file)
    if cfg.distributed_type == "MULTI_GPU" and int(cfg.num_machines or 1) == 1:
        if gpus is None:
            import torch

            gpus = torch.cuda.device_count()
        if gpus > 0:
            return gpus
    return int(cfg.num_processes or 1)


def _launch(cfg: Params, base: ResolvedBase, index: str, folder: Path, resume: str | None,
            progress: ProgressFn) -> None:
    """Distill under `accelerate launch` (`lcmlora distill` on every rank); the newest checkpoint's step drives `progress`."""
    folder.mkdir(parents=True, exist_ok=True)
    params_file = folder / "params.launch.yaml"
    # The ranks resolve the base by name: the launch's params name it (a new base is in no params.yaml).
    params_file.write_text(cfg.model_copy(update={"bases": {**cfg.bases, base.name: base.config}}).to_yaml())
    config = str(cfg.orchestrate.accelerate_config)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
           "--num_processes", str(accelerate_processes(config)), "-m", "flows.cli", "distill", "--params",
           str(params_file), "--base", base.name, "--latents", index, "--output", str(folder)]
    if resume:
        cmd += ["--resume", resume]
    log = folder / "launch.log"
    with open(log, "wb") as out:
        threads = {"OMP_NUM_THREADS": str(cfg.orchestrate.torch_threads)} if cfg.orchestrate.torch_threads else {}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **threads})
        while proc.poll() is None:
            time.sleep(5)
            progress(Progress(stage="distill", step=_steps_logged(folder), total=cfg.distill.max_steps,
                              note="accelerate launch"))
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"accelerate launch exited with {proc.returncode} ({log}):\n{tail}")


def _steps_logged(folder: Path) -> int:
    """Newest complete checkpoint's step (the progress a separate process leaves on disk)."""
    from components.distill.trainer import latest_checkpoint

    latest = latest_checkpoint(folder)
    return int(latest.name.split("-")[1]) if latest else 0


@task(name="distill", cache_key_fn=key_parameter, persist_result=True)
def distill_lora(cfg: Params, base: ResolvedBase, index_rel: str, key: str) -> dict[str, Any]:
    """Distill the LCM-LoRA of one base into `stages/distill/BASE/KEY/` (contract 4 folder).

    A LoRA stored there already (by `lcmlora distill`, or a run whose cache record is gone) is
    reused; a killed earlier attempt left checkpoints there, and the run resumes from them.
    """
    logger = get_run_logger()
    progress = task_progress("distill", base.name,
                             f"LCD-LoRA distillation of {base.name}: {cfg.distill.max_steps} steps")
    launch = None
    if accelerate_processes(cfg.orchestrate.accelerate_config) > 1:
        def launch(folder: Path, resume: str | None) -> None:
            _launch(cfg, base, index_rel, folder, resume, progress)

    out = distill_stage(cfg, base, Storage.from_config(cfg.storage), index=index_rel, key=key, launch=launch,
                        progress=progress)
    progress.finish()
    if out.reused:
        logger.info("reused the distilled LoRA at %s", out.rel)
    else:
        if out.note:
            logger.info("%s: %s", base.name, out.note)
        create_table_artifact(key=artifact_key("distill", base.name),
                              table=[{k: v for k, v in out.metrics.items() if not isinstance(v, (dict, list))}],
                              description=f"LCD-LoRA distillation of {base.name}")
    return {"output": out.rel, "weights_sha256": out.weights_sha256, "metrics": out.metrics}
