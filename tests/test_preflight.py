"""The preflight (components/preflight.py): every problem of every base, before any stage runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from components.config import load_params
from components.preflight import PreflightError, preflight, problems
from tests.toy_short import REPO, write_params


@pytest.fixture(scope="module")
def toy_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'fine-tune' of the toy base: a copy of data/toy/base in another folder (not recognised by path)."""
    copy = tmp_path_factory.mktemp("ft") / "my-ft"
    shutil.copytree(REPO / "data/toy/base", copy)
    return copy


def _params(tmp: Path, toy_copy: Path, judges: str, extra: list[str] | None = None) -> Path:
    return write_params(tmp, [f"bases.ft.reference={toy_copy}", "bases.ft.family=sd15", "bases.ft.resolution=32",
                              f"bases.ft.judges={judges}", *(extra or [])])


def test_toy_fine_tune_with_toy_judges_passes(tmp_path: Path, toy_copy: Path) -> None:
    cfg = load_params(_params(tmp_path, toy_copy, "toy"))
    assert problems(cfg) == []
    preflight(cfg)


def test_real_judges_without_their_files_name_every_key(tmp_path: Path, toy_copy: Path) -> None:
    cfg = load_params(_params(tmp_path, toy_copy, "real"))
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    text = str(err.value)
    for key in ("evaluate.feature_extractor", "evaluate.clip_model", "evaluate.reference_images"):
        assert f"ft: {key} is not set" in text, text
    assert "toy:" not in text, "the toy base (toy judges) has no problem"


def test_every_stage_s_problem_is_listed_at_once(tmp_path: Path, toy_copy: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        cfg = load_params(_params(tmp_path, toy_copy, "nosuch", [
            "bases.gone.reference=/nonexistent/base", "bases.gone.family=sd15",
            f"curate.source={tmp_path / 'no-source'}", "encode.device=cuda", f"storage.root={locked / 'artifacts'}",
            f"merge.style_file={tmp_path / 'style.safetensors'}", f"evaluate.prompts={tmp_path / 'prompts.txt'}"]))
        found = problems(cfg)
    finally:
        locked.chmod(0o700)
    text = "\n".join(found)
    assert "bases.gone.reference: base reference /nonexistent/base: no such file or folder" in text
    assert "ft: bases.ft.judges='nosuch': no entry point" in text
    assert f"curate.source={tmp_path / 'no-source'}: no such folder" in text
    assert "merge.style_file=" in text and "evaluate.prompts=" in text
    if os.geteuid() != 0:  # root writes anywhere
        assert "storage.root=" in text and "is not writable" in text
    import torch

    if not torch.cuda.is_available():
        assert "encode.device=cuda: no CUDA device" in text
    assert sum(line.startswith("merge.style_file") for line in found) == 1, "shared problems are said once"


def test_new_base_fails_in_preflight_before_any_stage(tmp_path: Path, toy_copy: Path) -> None:
    """`lcmlora new-base ft` with real judges and no files: one error in seconds, nothing written."""
    params = _params(tmp_path, toy_copy, "real")
    storage = Path(yaml.safe_load(params.read_text())["storage"]["root"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_API_URL": ""}
    # What the command costs before preflight (interpreter and imports), measured the same way beside
    # it: the bound is on preflight's own time, whatever the machine's load (issue 30, item 3).
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import flows.cli, components.preflight, torch, diffusers"],
                   check=True, cwd=REPO, env=env, capture_output=True, timeout=300)
    imports = time.monotonic() - t0
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "new-base", "ft", "--params", str(params)],
                         check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0 - imports
    assert out.returncode == 2, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert "preflight found 3 problem(s)" in text and "evaluate.feature_extractor is not set" in text, text
    assert not storage.exists(), "no stage ran: the storage root was never written"
    assert not (tmp_path / "source").exists(), "not even the toy source was written"
    assert seconds < 30, f"preflight took {seconds:.0f}s beyond the {imports:.0f}s of imports"
