"""Prefect task that configures the process the stage tasks run in."""

from __future__ import annotations

from prefect import task

from components.cli.quiet import quiet_known_noise


@task(name="torch-threads")
def set_torch_threads(threads: int | None) -> int:
    """Intra-op CPU threads for torch in this process (`orchestrate.torch_threads`); returns the count in use.

    On a machine shared with other jobs, one thread per process avoids oversubscription (in a
    measurement here under load 10 on 2 cores, a toy distillation step took 0.7 s with 1
    thread against 12-15 s with 2).

    Every flow run that starts a process's work passes here first (the nightly, new-base and
    base-pipeline flows), on a Prefect worker too: so the process also drops the libraries' known
    harmless output here, as the CLI's entry point does (components/cli/quiet.py).
    """
    import torch

    quiet_known_noise()
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
