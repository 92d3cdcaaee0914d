"""`lcmlora distill` resumes a crashed run from its keyed folder by default; `--restart` starts over.

The tiny SD-1.5 pipeline (tests/tiny_models.py) is the base; its VAE encodes the curated toy
manifest of tests/test_encode.py's `world` into shards, as `lcmlora encode` does.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.config import BaseConfig, ConfigError, DistillConfig
from components.lora.formats import LORA_WEIGHT_NAME
from components.stages.distill import prepare_run_folder
from tests.test_encode import RES, world  # noqa: F401 - the module fixture

REPO = Path(__file__).resolve().parents[1]
STEPS = ["--set", "distill.max_steps=4", "--set", "distill.checkpoint_every=2", "--set", "distill.batch_size=4",
         "--set", "distill.lora_rank=4", "--set", "distill.lora_alpha=4", "--set", "distill.lr=1e-3"]


class Killed(RuntimeError):
    """The injected crash: the process died right after writing a checkpoint."""


def _invoke(args: list[str]):
    from typer.testing import CliRunner

    from flows.cli import app

    return CliRunner().invoke(app, args)


@pytest.fixture
def tiny_world(world, tmp_path):  # noqa: F811
    """A params file on a tmp storage root holding the curated manifest and the tiny base's shards."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import tiny_pipeline

    tiny_pipeline("sd15", tmp_path / "build").save_pretrained(tmp_path / "base", safe_serialization=True)
    root = tmp_path / "root"
    shutil.copytree(Path(world["storage"].url("curated")), root / "curated")
    common = ["--params", str(REPO / "params.yaml"), "--set", f"storage.root={root}",
              "--set", f"curate.source={world['source'].url()}",
              "--set", f"bases.tiny={{reference: {tmp_path / 'base'}, family: sd15, resolution: {RES}}}",
              "--set", "encode.batch_size=8", "--set", "encode.shard_size=16", "--set", "encode.workers=1"]
    encoded = _invoke(["encode", "--base", "tiny", "--manifest", "curated/manifest.parquet", *common])
    assert encoded.exit_code == 0, encoded.output
    return root, [*common, *STEPS]


def _lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / LORA_WEIGHT_NAME))


def _crash_after_checkpoint(monkeypatch):
    from components.distill import trainer

    original = trainer._save_checkpoint

    def save_then_die(accelerator, state, run_dir, keep):
        folder = original(accelerator, state, run_dir, keep)
        raise Killed(f"killed after {folder.name}")

    monkeypatch.setattr(trainer, "_save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(trainer, "_save_checkpoint", original)


def test_rerun_resumes_from_the_checkpoint_and_restart_starts_over(tiny_world, tmp_path, monkeypatch):
    root, args = tiny_world
    # 1. The uninterrupted run, for comparison.
    full = _invoke(["distill", "--base", "tiny", "--output", str(tmp_path / "full"), *args])
    assert full.exit_code == 0, full.output
    expected = _lora(tmp_path / "full")

    # 2. A run in the keyed folder dies right after checkpoint-2.
    heal = _crash_after_checkpoint(monkeypatch)
    crashed = _invoke(["distill", "--base", "tiny", *args])
    heal()
    assert isinstance(crashed.exception, Killed), crashed.output
    (folder,) = (root / "stages" / "distill" / "tiny").iterdir()
    assert (folder / "checkpoints" / "checkpoint-2").is_dir() and not (folder / "_COMPLETE").exists()

    # 3. The same command again: resumes from checkpoint-2 by default, says so, ends where the full run did.
    resumed = _invoke(["distill", "--base", "tiny", *args])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from checkpoint-2 of {folder}" in resumed.stdout
    assert json.loads((folder / "lineage.json").read_text())["run"]["resumed_from"].endswith("checkpoint-2")
    got = _lora(folder)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), (name, (got[name] - tensor).abs().max().item())
    assert (folder / "_COMPLETE").is_file() and f"in {folder}" in resumed.stdout

    # 4. Finished: a rerun trains nothing and says where the LoRA is.
    again = _invoke(["distill", "--base", "tiny", *args])
    assert again.exit_code == 0 and f"unchanged: the LoRA of this config is at {folder}" in again.stdout

    # 5. --restart: crash again after checkpoint-2, then --restart removes it and trains from step 0.
    heal = _crash_after_checkpoint(monkeypatch)
    assert isinstance(_invoke(["distill", "--base", "tiny", "--restart", *args]).exception, Killed)
    heal()
    assert not (folder / "_COMPLETE").exists() and (folder / "checkpoints" / "checkpoint-2").is_dir()
    restarted = _invoke(["distill", "--base", "tiny", "--restart", *args])
    assert restarted.exit_code == 0, restarted.output
    assert f"starting over (--restart): removed 1 checkpoint(s) of {folder}" in restarted.stdout
    assert "resuming" not in restarted.stdout
    assert json.loads((folder / "lineage.json").read_text())["run"]["resumed_from"] is None
    assert all(torch.equal(_lora(folder)[k], v) for k, v in expected.items())


def test_checkpoints_of_other_settings_are_refused(tmp_path):
    base = BaseConfig(reference="data/toy/base", family="sd15", resolution=32)
    cfg = DistillConfig(max_steps=4)
    assert prepare_run_folder(cfg, "toy", base, tmp_path) == (None, None)  # nothing to resume: step 0
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state_rank0.json").write_text("{}")
    # a longer run of the same settings continues the shorter one
    longer = cfg.model_copy(update={"max_steps": 8, "checkpoint_every": 2})
    assert prepare_run_folder(longer, "toy", base, tmp_path) == ("latest", f"resuming from checkpoint-2 of {tmp_path}")
    with pytest.raises(ConfigError, match=r"distill\.lr differ.*pass --restart"):
        prepare_run_folder(cfg.model_copy(update={"lr": 1.0}), "toy", base, tmp_path)
    with pytest.raises(ConfigError, match=r"checkpoint-2: the checkpoint is past distill.max_steps=1"):
        prepare_run_folder(cfg.model_copy(update={"max_steps": 1}), "toy", base, tmp_path)
    assert prepare_run_folder(cfg.model_copy(update={"lr": 1.0}), "toy", base, tmp_path, restart=True) == (
        None, f"starting over (--restart): removed 1 checkpoint(s) of {tmp_path}")
    assert not checkpoint.exists()
