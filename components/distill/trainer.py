"""The accelerate training loop of LCD with LoRA: steps, checkpoints, resume, NaN stop, progress.

Algorithm 1's step itself is `components.distill.lcd.lcd_loss`; this loop draws its batches, takes the
gradient step (line 7), saves accelerate checkpoints into `run_dir/checkpoints` and reports
every optimizer step through one callback, `progress(Progress(stage="distill", ...))`, on rank 0
only. Checkpoint notices go through the same callback with `note="checkpoint-STEP"`.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from components.distill.lcd import LCDSettings, ddim_solver_timesteps, lcd_loss
from components.distill.speedups import (
    lcd_loss_bf16_teacher,
    make_optimizer,
    prefetched,
    to_device,
)
from components.lora.adapter import lora_parameters, unet_lora_state_dict
from components.models.conditioning import TextConditioner
from components.progress import Progress, ProgressFn

STAGE = "distill"  # the stage name in every Progress report of the loop
CHECKPOINT_DIR = "checkpoints"
_TRAINER_STATE = "trainer_state_rank{rank}.json"
_LORA_CHECKPOINT = "lora.safetensors"


class NonFiniteLoss(FloatingPointError):
    """The LCD loss became NaN or inf; the weights were not updated and no checkpoint was written."""


@dataclass
class TrainResult:
    """What one invocation of `train_lcd_lora` returns (every rank; the LoRA is the same on all)."""

    steps: int  # optimizer steps done in total (including before a resume)
    history: list[tuple[int, float]]  # (step, loss) for every step of the run, resumed part included
    lora_state_dict: dict[str, Tensor]  # peft keys, fp32 CPU
    seconds: float  # wall time of this invocation
    resumed_from: str | None
    world_size: int
    is_main_process: bool
    mixed_precision: str
    device: str
    samples_per_second: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainOptions:
    """Loop settings (from DistillConfig)."""

    max_steps: int
    lr: float = 1e-4
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0
    checkpoints_keep: int = 2
    hold_file: str | None = None  # after each checkpoint, wait while this file exists (a test's barrier)
    seed: int = 0
    cpu: bool = False
    # Speed-ups (docs/distill.md, "Speed-ups"); the defaults are the plain, bit-reproducible path.
    optimizer: str = "adamw"  # adamw | adamw_fused | adamw_8bit
    sync_every: int = 1  # host sync (NaN check, loss, progress) every N steps
    prefetch: int = 0  # batches read ahead by a thread (pinned memory on CUDA)
    compile_unet: bool = False  # torch.compile the UNet (teacher, target and student)
    compile_backend: str = "inductor"  # torch.compile backend (tests: aot_eager)
    channels_last: bool = False  # UNet weights in channels_last memory format
    bf16_teacher: bool = False  # teacher and target passes under bf16 autocast (student as mixed_precision)

    @classmethod
    def from_config(cls, cfg: Any) -> TrainOptions:
        """The loop settings of a DistillConfig (fields of the same names; absent ones keep the default)."""
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__ if hasattr(cfg, f)})


def _endless(batches: Callable[[], Iterable[dict]]) -> Iterator[dict]:
    """Batches forever: a finite loader is restarted (next epoch) when exhausted."""
    while True:
        empty = True
        for batch in batches():
            empty = False
            yield batch
        if empty:
            raise ValueError("the latent loader yielded no batch; check the shard index and distill.batch_size")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (trainer state written last) of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    done = [p for p in root.glob("checkpoint-*") if (p / _TRAINER_STATE.format(rank=0)).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class _TrainerState:
    """Step, CPU generator state and loss history: what accelerate's save_state does not keep.

    The generator is the same on every rank (seeded as rank 0's always was): each rank draws the
    global batch's timesteps, noise and guidance and keeps its rows (`lcd.draw_lcd_sample`).
    """

    def __init__(self, seed: int):
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.generator = torch.Generator().manual_seed(seed * 1_000_003)

    def save(self, folder: Path, rank: int) -> None:
        state = {"step": self.step, "history": self.history, "generator": self.generator.get_state().numpy().tobytes().hex()}
        tmp = folder / (_TRAINER_STATE.format(rank=rank) + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(folder / _TRAINER_STATE.format(rank=rank))

    def load(self, folder: Path, rank: int) -> None:
        path = folder / _TRAINER_STATE.format(rank=rank)
        if not path.exists():
            raise FileNotFoundError(f"{path}: checkpoint has no trainer state for rank {rank}; "
                                    "resume with the same number of processes it was written with")
        state = json.loads(path.read_text())
        self.step, self.history = int(state["step"]), [tuple(x) for x in state["history"]]
        self.generator.set_state(torch.frombuffer(bytearray(bytes.fromhex(state["generator"])), dtype=torch.uint8))


def _make_accelerator(opts: TrainOptions, run_dir: Path) -> Any:
    """A fresh Accelerator for one run (mixed precision, CPU or not, checkpoints under run_dir)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    # One process may train several times (nightly over bases, tests) with different mixed
    # precision; accelerate keeps that setting process-wide, so start each run from a fresh
    # AcceleratorState. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)

    # Without a GPU, say cpu=True so that N processes from `accelerate launch`/torchrun form a gloo group.
    cpu = opts.cpu or not torch.cuda.is_available()
    return Accelerator(mixed_precision=opts.mixed_precision, cpu=cpu,
                       project_config=ProjectConfiguration(project_dir=str(run_dir)))


def _register_lora_checkpoint_hooks(accelerator: Any, unet: Any) -> None:
    """accelerate checkpoints hold the LoRA weights only, never the frozen base (GBs for SDXL)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
            save_file(state, str(Path(output_dir) / _LORA_CHECKPOINT))
        while weights:
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            models.pop()
        result = set_peft_model_state_dict(unet, load_file(str(Path(input_dir) / _LORA_CHECKPOINT)))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{input_dir}: checkpoint LoRA keys do not fit this UNet: {unexpected[:3]}...")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def train_lcd_lora(
    unet: Any,
    conditioner: TextConditioner,
    batches: Callable[[int, int], Iterable[dict]],
    settings: LCDSettings,
    alpha_bar: Tensor,
    opts: TrainOptions,
    run_dir: str | Path,
    *,
    resume: str | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Algorithm 1 with LoRA under accelerate until `opts.max_steps`; the UNet must carry the LoRA adapter.

    `batches(rank, world_size)` returns a fresh iterable of this process's dict batches (the
    contract 3 loader format, e.g. `latent_loader.make_loader`); on resume the
    batches already consumed are skipped, so a resumed run sees the same data as an
    uninterrupted one. `resume`: None, "latest", or a checkpoint folder.

    World-size invariant: every rank draws the global batch's timesteps, noise and guidance from
    one generator and keeps its rows; DDP averages the ranks' gradients of their batch-mean
    losses (the global batch's mean loss, for equal per-rank batches) before clipping, which
    accelerate applies to the all-reduced gradients. So N processes of batch B train the LoRA
    one process of batch N B trains (to float rounding) when `batches(rank, world_size)` yields
    the rank's rows of the same global batches, as `make_loader(..., resample=True)` does.

    `progress` (rank 0 only) gets `Progress(stage="distill", step, total=max_steps, metrics=
    {"loss", "lr", "grad_norm", "samples_per_s", "step_seconds"})` after every optimizer step, and
    `Progress(..., note="checkpoint-STEP")` after every checkpoint is complete.
    """
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    # 1. Accelerator, dtypes, memory savers.
    accelerator = _make_accelerator(opts, run_dir)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet.to(device)
    if weight_dtype != torch.float32:
        unet.to(dtype=weight_dtype)  # frozen base in half precision; LoRA recast to fp32 below
    for p in lora_parameters(unet):  # trainable LoRA stays fp32 under autocast
        p.data = p.data.float()
    conditioner.to(device)
    for enc in conditioner.text_encoders:
        if weight_dtype != torch.float32:
            enc.to(dtype=weight_dtype)
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if opts.channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.train()
    alpha_bar = alpha_bar.to(device)
    solver_timesteps = ddim_solver_timesteps(settings.num_train_timesteps, settings.num_ddim_timesteps)

    # 2. Optimizer over the LoRA parameters only; warm-up then constant learning rate.
    params = lora_parameters(unet)
    optimizer = make_optimizer(opts.optimizer, params, lr=opts.lr, betas=(opts.adam_beta1, opts.adam_beta2),
                               weight_decay=opts.weight_decay, eps=opts.adam_eps)
    warmup = max(0, opts.lr_warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    student, optimizer, scheduler = accelerator.prepare(unet, optimizer, scheduler)
    _register_lora_checkpoint_hooks(accelerator, unet)
    if opts.compile_unet:  # in place: teacher, target and (DDP-wrapped) student all call the compiled forward
        unet.compile(backend=opts.compile_backend)
    loss_fn = step_loss(settings, opts)

    # 3. Resume: LoRA, optimizer, scheduler, RNG states, generator, history; skip consumed batches.
    state = _TrainerState(opts.seed)
    resumed_from = None
    if resume:
        ckpt = latest_checkpoint(run_dir) if resume == "latest" else Path(resume)
        if ckpt is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {run_dir / CHECKPOINT_DIR}; "
                                    "rerun without --resume (a rerun resumes by default when a checkpoint exists) or point --output at the interrupted run")
        accelerator.load_state(str(ckpt))
        state.load(ckpt, accelerator.process_index)
        resumed_from = str(ckpt)
    data = _endless(lambda: batches(accelerator.process_index, accelerator.num_processes))
    if state.step:
        data = itertools.islice(data, state.step, None)
    if opts.prefetch > 0:
        data = prefetched(data, opts.prefetch, pin=device.type == "cuda")
    last_good = resumed_from

    # 4. Steps. Every `sync_every` steps (and before a checkpoint and at the end) the host
    # waits for the device: losses, finiteness and grad norms of the pending steps, gathered.
    steps_run, samples_run = 0, 0
    every = max(1, opts.sync_every)
    pending: list[tuple[Tensor, int]] = []  # ([loss, finite, grad norm] on the device, samples)
    lrs: list[float] = []  # the learning rate after each pending step
    t_sync = time.perf_counter()
    while state.step < opts.max_steps:
        batch = next(data)
        if opts.prefetch > 0:
            batch = to_device(batch, device)
        latents = torch.as_tensor(batch["latents"]).float().to(device) * settings.scaling_factor
        with accelerator.autocast():
            cond = conditioner.conditioning(batch).to(device, weight_dtype)
            uncond = conditioner.unconditional(cond)
            loss = loss_fn(student, unet, latents, cond, uncond, settings, alpha_bar, solver_timesteps,
                           state.generator, rank=accelerator.process_index, world_size=accelerator.num_processes)
        accelerator.backward(loss)
        if opts.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(params, opts.max_grad_norm)
        else:
            grad_norm = torch.zeros((), device=device)
        local = torch.stack([loss.detach().float(), torch.isfinite(loss.detach()).float(),
                             torch.as_tensor(grad_norm, device=device).float()])
        n = latents.shape[0] * accelerator.num_processes
        pending.append((local, n))
        step_next = state.step + len(pending)  # the step just taken (reports lag until the sync)
        due = (every == 1 or step_next % every == 0 or step_next == opts.max_steps
               or (opts.checkpoint_every and step_next % opts.checkpoint_every == 0))
        if due:  # with sync_every 1: one host sync per step, before the weights are updated
            k = len(pending)
            stats = accelerator.gather(torch.stack([p[0] for p in pending])).reshape(-1, k, 3).cpu()
            for j in range(k):
                if not bool(stats[:, j, 1].min() == 1.0):
                    bad = state.step + 1 + j
                    late = ("" if j == k - 1 else
                            f" (found at step {step_next}: with distill.sync_every={every} the weights were "
                            f"updated after step {bad}, so they are not usable)")
                    raise NonFiniteLoss(
                        f"distill: LCD loss is {stats[:, j, 0].tolist()} at step {bad} (per process); stopped "
                        f"before updating the weights{late}. {nan_hint(last_good)}"
                    )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lrs.append(scheduler.get_last_lr()[0])
        if not due:
            continue
        report = progress if progress is not None and accelerator.is_main_process else None
        seconds_step = (time.perf_counter() - t_sync) / k
        for j, ((_, n), lr) in enumerate(zip(pending, lrs, strict=True)):
            loss_value, norm = stats[:, j, 0].mean().item(), stats[0, j, 2].item()
            state.step += 1
            steps_run += 1
            samples_run += n
            state.history.append((state.step, loss_value))
            if report is not None:
                report(Progress(stage=STAGE, step=state.step, total=opts.max_steps, metrics={
                    "loss": loss_value, "lr": lr, "grad_norm": norm,
                    "samples_per_s": n / seconds_step if seconds_step > 0 else 0.0, "step_seconds": seconds_step}))
        pending.clear()
        lrs.clear()
        if opts.checkpoint_every and state.step % opts.checkpoint_every == 0:
            last_good = str(_save_checkpoint(accelerator, state, run_dir, opts.checkpoints_keep))
            if report is not None:
                report(Progress(stage=STAGE, step=state.step, total=opts.max_steps,
                                note=Path(last_good).name))
            hold_while_present(opts.hold_file)
        t_sync = time.perf_counter()

    accelerator.wait_for_everyone()
    lora_sd = unet_lora_state_dict(accelerator.unwrap_model(student))
    seconds = time.perf_counter() - t0
    return TrainResult(
        steps=state.step, history=list(state.history), lora_state_dict=lora_sd, seconds=seconds,
        resumed_from=resumed_from, world_size=accelerator.num_processes, is_main_process=accelerator.is_main_process,
        mixed_precision=accelerator.mixed_precision, device=str(device),
        samples_per_second=samples_run / seconds if seconds > 0 else 0.0,
    )


def nan_hint(last_good: str | None) -> str:
    """What to do after a non-finite loss, with or without a checkpoint to resume from."""
    fixes = ("lower distill.lr, check the latent shards for NaNs, or set distill.mixed_precision=no, then rerun "
             "`lcmlora distill` (changed settings start at step 0 in their own keyed folder; `--restart` starts "
             "the same folder over)")
    if last_good:
        return (f"Last good checkpoint: {last_good}; rerunning `lcmlora distill` unchanged resumes from "
                f"{Path(last_good).name} by default. If the loss diverges again: {fixes}.")
    return f"No checkpoint was written yet, so there is nothing to resume from: {fixes}."


def step_loss(settings: LCDSettings, opts: TrainOptions) -> Callable[..., Tensor]:
    """The objective's composed step: Algorithm 1 (`lcd_loss`), or phased consistency for PCMSettings."""
    from components.distill.pcm import PCMSettings, pcm_loss

    if isinstance(settings, PCMSettings):
        if opts.bf16_teacher:
            raise ValueError("distill.bf16_teacher has no phased-consistency variant yet; set it false for "
                             "distill.objective=pcm")
        return pcm_loss
    return lcd_loss_bf16_teacher if opts.bf16_teacher else lcd_loss


def hold_while_present(path: str | None, poll_s: float = 0.2) -> None:
    """Wait while `path` exists (distill.hold_file): a test holds a run at a checkpoint, then acts on it."""
    while path and Path(path).exists():
        time.sleep(poll_s)


def _save_checkpoint(accelerator: Any, state: _TrainerState, run_dir: Path, keep: int) -> Path:
    """save_state into checkpoints/checkpoint-STEP; the trainer state is written last (marks it complete)."""
    folder = run_dir / CHECKPOINT_DIR / f"checkpoint-{state.step}"
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.process_index != 0:
        state.save(folder, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.save(folder, 0)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def loss_curve_rows(history: list[tuple[int, float]]) -> list[dict[str, float]]:
    """(step, loss) history -> rows with a trailing mean over 20 steps, for the CSV and the plot."""
    rows, window = [], []
    for step, loss in history:
        window = (window + [loss])[-20:]
        rows.append({"step": step, "loss": loss, "loss_mean20": sum(window) / len(window)})
    return rows

