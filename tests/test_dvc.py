"""dvc.yaml in a clean clone: `dvc repro` of the toy pipeline, then `dvc status` clean; metrics,
plots, lineage; `dvc push` to SeaweedFS and `dvc pull` back into an emptied workspace.

The clone's params.yaml gets the short toy settings (tests/toy_short.py); the CLI the stages
call is the clone's own (`python -m flows.cli` with the clone first on the path).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.dvc_runner import dvc_executable
from tests.toy_short import REPO, SHORT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UP_TO_DATE = "Data and pipelines are up to date."


def _sh(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def _clone(tmp: Path) -> Path:
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    from components.config import load_params

    cfg = load_params(clone / "params.yaml", SHORT)
    (clone / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return clone


def _env(clone: Path, tmp: Path) -> dict[str, str]:
    shim = tmp / "bin"
    shim.mkdir()
    (shim / "lcmlora").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m flows.cli "$@"\n')
    (shim / "lcmlora").chmod((shim / "lcmlora").stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PATH": f"{shim}:{Path(sys.executable).parent}:{env.get('PATH', '')}", "PYTHONPATH": str(clone),
                "HF_HUB_OFFLINE": "1", "HOME": env.get("HOME", str(tmp)),
                "OMP_NUM_THREADS": "1"})  # the machine is shared: one thread per stage process
    return env


def test_repro_in_a_clean_clone_then_status_clean_and_push_pull(s3_env, tmp_path: Path) -> None:
    clone = _clone(tmp_path)
    env = _env(clone, tmp_path)
    dvc = dvc_executable()

    _sh([dvc, "repro"], clone, env)
    assert UP_TO_DATE in _sh([dvc, "status"], clone, env)

    # Metrics, plots and lineage.
    metrics = json.loads(_sh([dvc, "metrics", "show", "--json"], clone, env))
    shown = json.dumps(metrics)
    assert "runs/evaluate/toy/metrics_flat.json" in shown and "runs/merge/toy/metrics_flat.json" in shown
    assert '"lcm-4.fd"' in shown and '"merge.gate.passed"' in shown
    _sh([dvc, "plots", "show", "-o", str(tmp_path / "plots")], clone, env)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "http" not in page.split("<body>")[0], "offline: no CDN script"
    assert (tmp_path / "plots" / "static" / "workspace_runs_evaluate_toy_metrics_vs_steps.png").is_file()
    lineage = json.loads((clone / "runs/distill/toy/lineage.json").read_text())
    head = _sh(["git", "rev-parse", "HEAD"], clone, env).strip()
    assert lineage["git"]["commit"] == head and lineage["dvc"]["dvc_version"]

    # Remote on SeaweedFS: push, empty the workspace and cache, pull, still up to date.
    bucket = s3_env.make_bucket()
    _sh(["bash", "infra/dvc_remote.sh", f"s3://{bucket}/dvc", s3_env.endpoint_url], clone, env)
    _sh([dvc, "push"], clone, env)
    shutil.rmtree(clone / ".dvc" / "cache")
    shutil.rmtree(clone / "runs")
    _sh([dvc, "pull"], clone, env)
    assert (clone / "runs/evaluate/toy/lora/pytorch_lora_weights.safetensors").is_file()  # the gated copy
    assert UP_TO_DATE in _sh([dvc, "status"], clone, env)


def test_metrics_show_and_diff_print_the_flat_quality_figures_and_plots_render_offline(tmp_path: Path) -> None:
    """The repository's `metrics:` and `plots:` in a real DVC repo over the files the stages write."""
    from PIL import Image

    from components.evaluate.flat_metrics import (
        evaluation_scalars,
        merge_scalars,
        write_flat_metrics,
    )

    repo, dvc = tmp_path / "repo", dvc_executable()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    repo.mkdir()
    _sh(["git", "init", "-q"], repo, env)
    _sh(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "0"],
        repo, env)
    _sh([dvc, "init", "-q"], repo, env)
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"metrics": spec["metrics"], "plots": spec["plots"]}))

    def write_run(fd4: float, passed: bool) -> None:
        methods = [{"label": "lcm-4", "fd": fd4, "adherence": 0.975, "psnr": 21.1, "ssim": 0.82},
                   {"label": "ddim-50", "fd": 250.0, "adherence": 1.0, "psnr": None, "ssim": None}]
        write_flat_metrics(_mkdir(repo / "runs/evaluate/toy"),
                           evaluation_scalars({"methods": methods, "gate": {"passed": passed}}))
        rows = [{"label": "merged LoRA (0.8, 1)", "fd": 41.5, "adherence": 0.9, "style_retention": 0.93}]
        write_flat_metrics(_mkdir(repo / "runs/merge/toy"), merge_scalars(
            {"rows": rows, "selection": {"passed": True, "best": {"label": "merged LoRA (0.8, 1)", "l1": 0.8, "l2": 1}}}))

    write_run(273.96, True)
    for rel in spec["plots"]:
        Image.new("RGB", (4, 4)).save(_mkdir((repo / rel).parent) / Path(rel).name)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "run 1"], repo, env)

    shown = json.loads(_sh([dvc, "metrics", "show", "--json"], repo, env))
    data = {k: v["data"] for k, v in shown[""]["data"].items()}
    assert data["runs/evaluate/toy/metrics_flat.json"] == {
        "ddim-50.adherence": 1.0, "ddim-50.fd": 250.0, "gate.passed": 1, "lcm-4.adherence": 0.975,
        "lcm-4.fd": 273.96, "lcm-4.psnr": 21.1, "lcm-4.ssim": 0.82}
    assert data["runs/merge/toy/metrics_flat.json"]["merge.style_retention"] == 0.93
    assert data["runs/merge/toy/metrics_flat.json"]["merge.gate.passed"] == 1

    write_run(300.5, False)  # the next run: worse FD, gate failed
    diff = json.loads(_sh([dvc, "metrics", "diff", "--json"], repo, env))["runs/evaluate/toy/metrics_flat.json"]
    assert diff["lcm-4.fd"] == {"old": 273.96, "new": 300.5, "diff": pytest.approx(26.54)}
    assert diff["gate.passed"] == {"old": 1, "new": 0, "diff": -1}

    _sh([dvc, "plots", "show", "-o", str(tmp_path / "plots")], repo, env)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "<script" not in page and "http" not in page.replace("http-equiv", ""), "renders offline: no CDN script"
    assert (tmp_path / "plots/static/workspace_runs_distill_toy_loss_curve.png").is_file()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
