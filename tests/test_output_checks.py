"""Distill checks its output folder before training (components/distill/output_checks.py, issue 16 item 2):
writable, replaceable, and with room for the artifact; every failure comes before step 1."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from components.config import load_params
from components.distill.output_checks import (
    NotEnoughSpace,
    OutputNotWritable,
    distill_artifact_bytes,
)
from components.storage.atomic_dir import FolderNotReplaceable
from tests.test_stage_distill import distill
from tests.test_trainer import memory_batches
from tests.tiny_models import tiny_pipeline
from tests.tiny_pipeline import single_thread

REPO = Path(__file__).resolve().parent.parent
one_thread = pytest.fixture(autouse=True)(single_thread)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_pipeline("sd15", folder / "build").save_pretrained(folder / "base")
    return folder / "base"


def params_for(base_dir: Path, *overrides: str):
    return load_params(REPO / "params.yaml", [
        f"bases.tiny={{reference: {base_dir}, family: sd15, resolution: 32, guidance_scale: 3.0}}",
        "distill.lora_rank=4", "distill.lora_alpha=4", "distill.max_steps=2", "distill.batch_size=4",
        "distill.checkpoint_every=1", *overrides])


def run(base_dir: Path, output: Path, reports: list, *overrides: str):
    return distill(params_for(base_dir, *overrides), "tiny", output, batches=memory_batches("sd15"),
                   latents_info={"index": "memory"}, progress=reports.append)


def test_output_below_a_regular_file_fails_before_step_1(tmp_path, base_dir):
    (tmp_path / "a-file").write_text("not a folder")
    reports: list = []
    with pytest.raises(OutputNotWritable, match=r"a-file.*is a file, not a folder"):
        run(base_dir, tmp_path / "a-file" / "out", reports)
    assert reports == []  # no step, no checkpoint


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 folder; the other tests cover root")
def test_read_only_output_folder_fails_before_step_1(tmp_path, base_dir):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    reports: list = []
    try:
        with pytest.raises(OutputNotWritable, match=str(parent)):
            run(base_dir, parent / "out", reports)
    finally:
        parent.chmod(0o755)
    assert reports == []


def test_too_little_free_space_fails_before_step_1_naming_folder_and_bytes(tmp_path, base_dir, monkeypatch):
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    seen: list[str] = []

    def small_disk(path):
        seen.append(str(path))
        return usage(real(path).total, real(path).total - 1000, 1000)

    monkeypatch.setattr("components.distill.output_checks.shutil.disk_usage", small_disk)
    reports: list = []
    with pytest.raises(NotEnoughSpace) as err:
        run(base_dir, tmp_path / "runs" / "out", reports)
    assert reports == [] and seen == [str(tmp_path)]
    message = str(err.value)
    assert str(tmp_path / "runs" / "out") in message and "1000 free" in message
    need = int(message.split(" bytes needed")[0].rsplit("(", 1)[1])
    assert need > distill_artifact_bytes(lora_params=1, checkpoints=0)  # sized from the LoRA and checkpoints


def test_folder_with_foreign_files_is_refused_before_step_1(tmp_path, base_dir):
    out = tmp_path / "project"
    out.mkdir()
    (out / "train.py").write_text("# someone's code\n")
    reports: list = []
    with pytest.raises(FolderNotReplaceable, match=r"project: holds train.py"):
        run(base_dir, out, reports)
    assert reports == [] and (out / "train.py").exists()


def test_expected_bytes_grow_with_params_and_checkpoints():
    small = distill_artifact_bytes(lora_params=1000, checkpoints=0)
    assert distill_artifact_bytes(lora_params=2000, checkpoints=0) - small == 2 * 1000 * 4  # two fp32 files
    assert distill_artifact_bytes(lora_params=1000, checkpoints=2) - small == 3 * 3 * 1000 * 4


def test_rerun_replaces_the_folder_and_files_follow_the_umask(tmp_path, base_dir):
    out = tmp_path / "out"
    reports: list = []
    first = run(base_dir, out, reports)
    (out / "evaluation").mkdir()
    (out / "evaluation" / "report.md").write_text("an evaluation of the first run's weights\n")
    previous = os.umask(0o022)
    try:
        second = run(base_dir, out, reports, "distill.seed=1")
    finally:
        os.umask(previous)
    assert second.weights_sha256 != first.weights_sha256
    assert not (out / "evaluation").exists()  # the previous run's evaluation described other weights
    assert not (out / "checkpoints").exists()  # finished: removed, as before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old sibling left
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
    assert oct(out.stat().st_mode & 0o777) == "0o755"
