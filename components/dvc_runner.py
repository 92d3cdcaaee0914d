"""DVC commands run one at a time per repository.

DVC holds one lock per repository (`.dvc/tmp/lock`) and a second command fails at once with
"Unable to acquire lock" instead of waiting. Flows that overlap (a nightly and a new-base
run on the same worker) therefore serialize their DVC calls on their own file lock, waiting
for it with a timeout (`filelock`), and run `dvc` as a subprocess (DVC's Python API is not
thread-safe).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from components.executables import venv_executable

LOCK_NAME = "lcmlora-dvc.lock"  # under .dvc/tmp/, beside DVC's own lock


class DvcError(RuntimeError):
    """A DVC command failed; the message holds the command and its output's tail."""


def dvc_executable() -> str:
    """`dvc` beside this Python (the project venv) or on PATH."""
    found = venv_executable("dvc")
    if found is None:
        raise DvcError("dvc not found: install the project (pip install -e .), which brings dvc[s3]")
    return found


@contextmanager
def repo_lock(repo: str | Path, timeout_s: float = 600.0, poll_s: float = 0.2) -> Iterator[None]:
    """Exclusive inter-process lock for DVC calls on `repo`; waits up to `timeout_s`."""
    tmp = Path(repo) / ".dvc" / "tmp"
    if not tmp.parent.is_dir():
        raise DvcError(f"{repo}: not a DVC repository (no .dvc/); run `dvc init` there first")
    tmp.mkdir(exist_ok=True)
    lock = FileLock(tmp / LOCK_NAME, timeout=timeout_s)
    try:
        lock.acquire(poll_interval=poll_s)
    except Timeout:
        raise DvcError(f"{tmp / LOCK_NAME}: another DVC call held the lock for over {timeout_s:.0f}s") from None
    try:
        yield
    finally:
        lock.release()


def run_dvc(args: list[str], repo: str | Path = ".", *, timeout_s: float = 3600.0,
            lock_timeout_s: float = 600.0, env: dict[str, str] | None = None) -> str:
    """Run `dvc ARGS` in `repo` under the repository's lcmlora lock; return its stdout."""
    cmd = [dvc_executable(), *args]
    with repo_lock(repo, lock_timeout_s):
        out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout_s,
                             env={**os.environ, **(env or {})}, check=False)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-20:])
        raise DvcError(f"`dvc {' '.join(args)}` in {repo} exited with {out.returncode}:\n{tail}")
    return out.stdout
