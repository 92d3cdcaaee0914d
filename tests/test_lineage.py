"""components/lineage.py: git and DVC revision, hardware, times, in a real git repository."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from components.lineage import Stopwatch, collect, dvc_revision, git_revision, write_lineage


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    _git(repo, "add", "dvc.lock")
    _git(repo, "commit", "-qm", "init")
    return repo


def test_git_revision_and_dirty_flag(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    head = _git(repo, "rev-parse", "HEAD")
    assert git_revision(repo) == {"commit": head, "dirty": False, "branch": _git(repo, "rev-parse", "--abbrev-ref", "HEAD")}
    (repo / "dvc.lock").write_text("changed\n")
    assert git_revision(repo)["dirty"] is True
    assert git_revision(tmp_path / "nowhere") == {"commit": None, "dirty": None, "branch": None}


def test_dvc_revision_hashes_dvc_lock(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    rev = dvc_revision(repo)
    assert rev["dvc_lock_sha256"] == hashlib.sha256((repo / "dvc.lock").read_bytes()).hexdigest()
    assert rev["dvc_version"]
    assert dvc_revision(tmp_path)["dvc_lock_sha256"] is None


def test_collect_and_write(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    with Stopwatch() as sw:
        pass
    record = collect(stage="distill", params_digest="abc", inputs={"base": {"unet": "f00"}}, started_at=sw.started_at,
                     repo=repo, extra={"run": {"steps": 3}})
    assert record["git"]["commit"] == _git(repo, "rev-parse", "HEAD") and record["dvc"]["dvc_lock_sha256"]
    assert record["hardware"]["cpu_count"] >= 1 and "torch" in record["hardware"]
    assert record["started_at"] <= record["finished_at"] and record["run"] == {"steps": 3}
    path = write_lineage(tmp_path, record)
    assert json.loads(path.read_text()) == json.loads(json.dumps(record, default=str))


def test_written_records_hold_no_absolute_local_path(tmp_path: Path) -> None:
    from components.lineage import portable, portable_yaml
    from components.paths import PROJECT_ROOT

    record = {"base": {"reference": str(PROJECT_ROOT / "data/toy/base"), "hub": "org/model"},
              "inputs": [str(tmp_path / "style.safetensors"), "s3://bucket/x"], "steps": 3, "note": "a / b"}
    written = json.loads(write_lineage(tmp_path, record).read_text())
    assert written["base"] == {"reference": "data/toy/base", "hub": "org/model"}  # inside the repo: relative
    assert written["inputs"] == ["local:style.safetensors", "s3://bucket/x"]  # elsewhere: its name, no path
    assert written["steps"] == 3 and written["note"] == "a / b"
    assert portable(record) == written
    text = portable_yaml(f"storage:\n  root: {tmp_path / 'artifacts'}\nbases:\n  toy:\n"
                         f"    reference: {PROJECT_ROOT / 'data/toy/base'}\n")
    assert "root: local:artifacts" in text and "reference: data/toy/base" in text and str(tmp_path) not in text
