"""The LCD-LoRA training loop (components/distill/trainer.py): resume equality, NaN stop, bf16, DDP, progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.config import DistillConfig
from components.distill.lcd import LCDSettings, schedule_from_scheduler_config
from components.distill.trainer import (
    NonFiniteLoss,
    TrainOptions,
    latest_checkpoint,
    list_checkpoints,
    loss_curve_rows,
    train_lcd_lora,
)
from components.lora.adapter import add_lora, lora_config
from components.models.conditioning import TextConditioner
from components.progress import Progress
from tests.tiny_models import tiny_pipeline

REPO = Path(__file__).resolve().parent.parent
TARGETS = DistillConfig().target_modules
SETTINGS_SD15 = LCDSettings(family="sd15", prediction_type="epsilon", scaling_factor=0.18215, guidance_min=2.0,
                            guidance_max=4.0)
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def memory_batches(family: str, batch: int = 4, n_batches: int = 3, nan_at: int | None = None):
    """An in-memory loader in the contract-3 batch format: factory(rank, world_size) -> batches of one epoch."""
    def factory(rank: int, world_size: int):
        g = torch.Generator().manual_seed(1000 + rank)
        for i in range(n_batches):
            latents = torch.randn(batch, 4, 8, 8, generator=g) * 4.0
            if nan_at is not None and i == nan_at:
                latents[0, 0, 0, 0] = float("nan")
            labels = torch.randint(0, 10, (batch,), generator=g).tolist()
            yield {"latents": latents, "captions": [f"a handwritten digit {WORDS[d]}" for d in labels],
                   "original_size": torch.tensor([[32, 32]] * batch), "crop_top_left": torch.zeros(batch, 2, dtype=torch.long),
                   "target_size": torch.tensor([[32, 32]] * batch)}
    return factory


def train_tiny(tmp: Path, run: str, *, family: str = "sd15", max_steps: int = 6, resume: str | None = None,
               checkpoint_every: int = 3, progress=None, nan_at: int | None = None, **options):
    pipe = tiny_pipeline(family, tmp / "pipe")
    torch.manual_seed(0)
    add_lora(pipe.unet, lora_config(4, 8, TARGETS))
    settings = SETTINGS_SD15 if family == "sd15" else LCDSettings(**{**SETTINGS_SD15.__dict__, "family": "sdxl"})
    return train_lcd_lora(pipe.unet, TextConditioner.from_pipeline(pipe, family),
                          memory_batches(family, nan_at=nan_at), settings,
                          schedule_from_scheduler_config(dict(pipe.scheduler.config)),
                          TrainOptions(max_steps=max_steps, lr=1e-3, checkpoint_every=checkpoint_every, seed=0, **options),
                          tmp / run, resume=resume, progress=progress), pipe


def test_resume_latest_matches_uninterrupted_run(tmp_path):
    full, _ = train_tiny(tmp_path, "full")

    class Killed(Exception):
        pass

    def kill_after_5(report: Progress):
        if report.step == 5:
            raise Killed

    with pytest.raises(Killed):
        train_tiny(tmp_path, "killed", progress=kill_after_5)
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-3"
    resumed, _ = train_tiny(tmp_path, "killed", resume="latest")
    assert resumed.resumed_from.endswith("checkpoint-3")
    assert [s for s, _ in resumed.history] == list(range(1, 7))
    for (_, a), (_, b) in zip(full.history, resumed.history, strict=True):
        assert abs(a - b) < 1e-6
    assert full.lora_state_dict.keys() == resumed.lora_state_dict.keys()
    for k, v in full.lora_state_dict.items():
        assert (v - resumed.lora_state_dict[k]).abs().max() < 1e-6, k
    assert sum(v.abs().sum() for k, v in full.lora_state_dict.items() if "lora_B" in k) > 0  # it trained


def test_progress_reports_every_step_and_each_checkpoint(tmp_path):
    """One channel: a Progress per optimizer step with loss/lr/throughput, and a note per finished checkpoint."""
    reports: list[Progress] = []
    result, _ = train_tiny(tmp_path, "run", max_steps=4, checkpoint_every=2, progress=reports.append)
    steps = [r for r in reports if not r.note]
    notes = [r for r in reports if r.note]
    assert all(r.stage == "distill" and r.total == 4 for r in reports)
    assert [r.step for r in steps] == [1, 2, 3, 4]
    assert [(r.step, r.note) for r in notes] == [(2, "checkpoint-2"), (4, "checkpoint-4")]
    assert all((tmp_path / "run" / "checkpoints" / r.note).is_dir() for r in notes)
    for r, (step, loss) in zip(steps, result.history, strict=True):
        assert r.step == step and r.metrics["loss"] == loss  # the same (rank-averaged) loss as the history
        assert r.metrics["lr"] == pytest.approx(1e-3)
        assert r.metrics["samples_per_s"] > 0 and r.metrics["step_seconds"] > 0
        assert r.metrics["grad_norm"] >= 0
    assert steps[-1].fraction == 1.0
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2", "checkpoint-4"]


def test_loss_curve_rows_trailing_mean_of_20():
    history = [(i + 1, float(i)) for i in range(25)]
    rows = loss_curve_rows(history)
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert rows[0]["loss_mean20"] == 0.0 and rows[1]["loss_mean20"] == 0.5
    assert rows[-1]["loss_mean20"] == sum(range(5, 25)) / 20  # the last 20 losses only


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"step 3.*checkpoint-2.*resumes from checkpoint-2 by default") as err:
        train_tiny(tmp_path, "nan", max_steps=6, checkpoint_every=2, nan_at=2)
    assert "nan" in str(err.value)
    assert latest_checkpoint(tmp_path / "nan").name == "checkpoint-2"
    assert not (tmp_path / "nan" / "checkpoints" / "checkpoint-3").exists()


def test_nan_before_any_checkpoint_says_what_to_do_instead_of_resuming(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"step 1.*No checkpoint was written yet.*lower distill.lr.*--restart"):
        train_tiny(tmp_path, "nan0", max_steps=4, checkpoint_every=2, nan_at=0)
    assert latest_checkpoint(tmp_path / "nan0") is None


def test_bf16_mixed_precision_and_gradient_checkpointing(tmp_path):
    """After an fp32 run in the same process: bf16 frozen base, fp32 LoRA, checkpointed UNet, finite losses."""
    train_tiny(tmp_path, "fp32", max_steps=1, checkpoint_every=0)
    result, pipe = train_tiny(tmp_path, "bf16", max_steps=2, checkpoint_every=0, mixed_precision="bf16",
                              gradient_checkpointing=True)
    assert result.mixed_precision == "bf16" and pipe.unet.is_gradient_checkpointing
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16  # frozen, no LoRA on conv_in
    assert all(v.dtype == torch.float32 for v in result.lora_state_dict.values())
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.history)


def test_ddp_two_cpu_processes_keep_identical_lora(tmp_path):
    """`accelerate launch --multi_gpu` spawns the processes (torchrun); with no GPU they form a gloo group."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29561",
           str(REPO / "tests" / "distill_worker.py"), str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"]  # same LoRA weights on both ranks
    assert ranks[0]["lora_B_abs_sum"] > 0
    assert ranks[0]["history"] == ranks[1]["history"]  # the loss is reduced over ranks


def test_pcm_objective_trains_through_the_same_loop_and_lowers_its_loss(tmp_path):
    """distill.objective=pcm (issue 29): the same trainer, its step `pcm_loss`. The loss on fixed draws
    (one batch, 8 fixed generators: each step's own draws are random timesteps) is lower after 12 steps
    than at the LoRA's zero init."""
    from components.config import BaseConfig
    from components.distill.lcd import ddim_solver_timesteps
    from components.distill.pcm import PCMSettings, pcm_loss
    from components.stages.distill import lcd_settings

    cfg = DistillConfig(objective="pcm", pcm_phases=2, loss_type="l2")
    base = BaseConfig(reference="unused", family="sd15", resolution=32, guidance_scale=3.0)
    settings = lcd_settings(cfg, "tiny", base, "sd15", {"num_train_timesteps": 1000}, 0.18215)
    assert isinstance(settings, PCMSettings) and settings.pcm_phases == 2
    pipe = tiny_pipeline("sd15", tmp_path / "pipe")
    torch.manual_seed(0)
    add_lora(pipe.unet, lora_config(4, 8, TARGETS))
    conditioner = TextConditioner.from_pipeline(pipe, "sd15")
    alpha_bar = schedule_from_scheduler_config(dict(pipe.scheduler.config))
    batch = next(iter(memory_batches("sd15", n_batches=1)(0, 1)))
    latents = batch["latents"] * settings.scaling_factor
    solver = ddim_solver_timesteps(settings.num_train_timesteps, settings.num_ddim_timesteps)

    def fixed_loss() -> float:
        with torch.no_grad():
            cond = conditioner.conditioning(batch)
            uncond = conditioner.unconditional(cond)
            return sum(pcm_loss(pipe.unet, pipe.unet, latents, cond, uncond, settings, alpha_bar, solver,
                                torch.Generator().manual_seed(g)).item() for g in range(8)) / 8

    before = fixed_loss()
    result = train_lcd_lora(pipe.unet, conditioner, memory_batches("sd15", n_batches=1), settings, alpha_bar,
                            TrainOptions(max_steps=12, lr=1e-3, seed=0), tmp_path / "run")
    assert len(result.history) == 12 and all(torch.isfinite(torch.tensor([x for _, x in result.history])))
    after = fixed_loss()
    assert after < before, (before, after)
    with pytest.raises(ValueError, match="bf16_teacher"):
        train_lcd_lora(pipe.unet, conditioner, memory_batches("sd15"), settings, alpha_bar,
                       TrainOptions(max_steps=1, seed=0, bf16_teacher=True), tmp_path / "run2")
