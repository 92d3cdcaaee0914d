"""Prefect task of the distill stage: LCD-LoRA training with a live progress artifact.

In-process by default. With `orchestrate.accelerate_config` naming a config of more than one
process (infra/accelerate/), the task runs `accelerate launch ... -m flows.cli distill` with
the resolved params written beside the run, and follows progress through the run's
`progress.json` written by rank 0.
"""

from __future__ import annotations

import json
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
from components.progress import Progress, ProgressFn
from components.stages.inputs import lora_sha256
from components.stages.keys import output_rel
from components.storage.folder_sync import is_complete, pull_folder, push_folder, work_dir
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


def _launch(cfg: Params, base_name: str, folder: Path, resume: str | None, progress: ProgressFn) -> None:
    """Distill under `accelerate launch`; the newest checkpoint's step drives `progress`."""
    folder.mkdir(parents=True, exist_ok=True)
    params_file = folder / "params.launch.yaml"
    params_file.write_text(cfg.to_yaml())
    config = str(cfg.orchestrate.accelerate_config)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
           "--num_processes", str(accelerate_processes(config)), "-m", "flows.cli", "distill", "--params", str(params_file), "--base", base_name, "--output", str(folder)]
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


def distill_for_task(cfg: Params, base_name: str, folder: Path, progress: ProgressFn) -> None:
    """The one call of the distill stage from a task: in-process, or under `accelerate launch`.

    A killed earlier attempt left checkpoints in the same keyed folder: the run resumes from
    them (`prepare_run_folder`, as `lcmlora distill` does).
    """
    from components.models.base_model import resolve_base
    from components.stages.distill import prepare_run_folder, run_distill

    name, base = resolve_base(cfg, base_name)
    resume, note = prepare_run_folder(cfg.distill, name, base, folder)
    if note:
        get_run_logger().info("%s: %s", base_name, note)
    if accelerate_processes(cfg.orchestrate.accelerate_config) > 1:
        _launch(cfg, base_name, folder, resume, progress)
        return
    run_distill(cfg.distill, base_name=name, base=base, storage=Storage.from_config(cfg.storage),
                latents_index=cfg.distill.latents_index, output=folder, resolved_yaml=cfg.to_yaml(),
                params_digest=cfg.digest(), resume=resume, progress=progress)


@task(name="distill", cache_key_fn=key_parameter, persist_result=True)
def distill_lora(cfg: Params, base_name: str, index_rel: str, key: str) -> dict[str, Any]:
    """Distill the LCM-LoRA of one base into `stages/distill/BASE/KEY/` (contract 4 folder)."""
    storage = Storage.from_config(cfg.storage)
    out = output_rel("distill", key, base_name)
    if is_complete(storage, out):  # stored by `lcmlora distill`, or a run whose cache record is gone
        folder = pull_folder(storage, out)
        get_run_logger().info("reused the distilled LoRA at %s", storage.url(out))
        metrics = json.loads((folder / "metrics.json").read_text())["distill"]
        return {"output": out, "weights_sha256": lora_sha256(folder), "metrics": metrics}
    folder = work_dir(storage, out)
    cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"latents_index": index_rel})})
    progress = task_progress("distill", base_name,
                             f"LCD-LoRA distillation of {base_name}: {cfg.distill.max_steps} steps")
    distill_for_task(cfg, base_name, folder, progress)
    progress.finish()

    metrics = json.loads((folder / "metrics.json").read_text())["distill"]
    push_folder(storage, folder, out)
    create_table_artifact(key=artifact_key("distill", base_name),
                          table=[{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}],
                          description=f"LCD-LoRA distillation of {base_name}")
    return {"output": out, "weights_sha256": lora_sha256(folder), "metrics": metrics}
