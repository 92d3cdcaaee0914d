"""components/dvc_runner.py: DVC calls in one repository run one at a time, across processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.dvc_runner import DvcError, repo_lock, run_dvc

HOLD = """
import sys, time
from components.dvc_runner import repo_lock
with repo_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


def test_a_second_call_waits_for_the_first(repo: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(repo), "2.0"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        out = run_dvc(["status"], repo)
        waited = time.monotonic() - t0
    finally:
        holder.wait(timeout=30)
    assert waited >= 1.0, f"dvc ran after {waited:.2f}s although another process held the lock"
    assert "no data or pipelines tracked" in out


def test_lock_timeout_and_failures_are_clear(repo: Path, tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(repo), "5.0"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DvcError, match="held the lock"), repo_lock(repo, timeout_s=0.5):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with pytest.raises(DvcError, match="exited with"):
        run_dvc(["repro", "no-such-stage"], repo)
    with pytest.raises(DvcError, match="not a DVC repository"):
        run_dvc(["status"], tmp_path / "elsewhere")
