"""Latent Consistency Distillation with LoRA (LCM-LoRA report, Algorithm 1): the step and the loop.

One UNet serves three roles: the student f_theta (LoRA on), the target f_theta- (the same
LoRA student under no_grad: LoRA LCD keeps no EMA network), and the teacher (adapters
disabled: the frozen base). Batches are pre-encoded latents (contract 3), so no VAE runs in
the loop; text embeddings come from the batch when the shards carry them.

Side effects leave through callbacks (`on_step`, `on_checkpoint`); the loop itself writes only
accelerate checkpoints into `run_dir/checkpoints`.
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

from components import lcd
from components.lora import adapters_disabled, lora_parameters

CHECKPOINT_DIR = "checkpoints"
_TRAINER_STATE = "trainer_state_rank{rank}.json"
_LORA_CHECKPOINT = "lora.safetensors"


class NonFiniteLoss(FloatingPointError):
    """The LCD loss became NaN or inf; the weights were not updated and no checkpoint was written."""


# --- settings and conditioning -----------------------------------------------------------------


@dataclass(frozen=True)
class LCDSettings:
    """Everything the step needs besides the networks, resolved from DistillConfig and BaseConfig."""

    family: str  # sd15 | sdxl
    prediction_type: str  # epsilon | v_prediction (from the base's scheduler unless params say)
    scaling_factor: float  # VAE latent scaling (latents in shards are unscaled)
    guidance_min: float  # CFG scale (w + 1); equal bounds: fixed guidance
    guidance_max: float
    num_train_timesteps: int = 1000
    num_ddim_timesteps: int = 50
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    loss_type: str = "huber"
    huber_c: float = 0.001

    @property
    def skip(self) -> int:
        """k = T / N, the skipping interval of the DDIM solver."""
        return self.num_train_timesteps // self.num_ddim_timesteps


@dataclass
class Conditioning:
    """UNet text conditioning of a batch: embeddings [B, L, D], and for SDXL pooled [B, P] and time ids [B, 6]."""

    embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def cat(self, other: Conditioning) -> Conditioning:
        """[self; other] along the batch (cond and uncond in one teacher forward)."""
        def c(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None else torch.cat([a, b.to(a.dtype)])
        return Conditioning(c(self.embeds, other.embeds), c(self.pooled, other.pooled), c(self.time_ids, other.time_ids))

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Conditioning:
        def m(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, dtype if t.is_floating_point() and dtype else t.dtype)
        return Conditioning(m(self.embeds), m(self.pooled), m(self.time_ids))


def sdxl_time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """SDXL micro-conditioning add_time_ids = (orig h, orig w, crop top, crop left, target h, target w); float [B, 6]."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


class TextConditioner:
    """Captions -> Conditioning with the base's text encoder(s), plus the unconditional embedding.

    sd15: last hidden state of the one CLIP encoder; unconditional = the empty prompt.
    sdxl: penultimate hidden states of both encoders concatenated, pooled from the second;
    unconditional = zeros (SDXL's force_zeros_for_empty_prompt), as the SDXL pipeline does.
    """

    def __init__(self, family: str, tokenizers: list[Any], text_encoders: list[Any], uncond_embeds: Tensor | None = None):
        """`uncond_embeds` [1, L, D]: a precomputed empty-prompt embedding (sd15), e.g. when batches carry embeddings."""
        if family == "sdxl" and text_encoders and len(text_encoders) != 2:
            raise ValueError("sdxl family needs two text encoders (text_encoder, text_encoder_2)")
        self.family, self.tokenizers, self.text_encoders = family, tokenizers, text_encoders
        self._uncond: Conditioning | None = None if uncond_embeds is None else Conditioning(uncond_embeds)

    @classmethod
    def from_pipeline(cls, pipe: Any, family: str) -> TextConditioner:
        if family == "sdxl":
            return cls(family, [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
        return cls(family, [pipe.tokenizer], [pipe.text_encoder])

    def to(self, device: torch.device) -> TextConditioner:
        for enc in self.text_encoders:
            enc.to(device).requires_grad_(False).eval()
        return self

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor | None]:
        """(prompt_embeds [B, L, D], pooled [B, P] or None)."""
        if not self.text_encoders:
            raise ValueError("the batch has no prompt_embeds and no text encoder is loaded to encode its captions")
        embeds, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            if self.family == "sd15":
                embeds.append(enc(ids)[0])
            else:
                out = enc(ids, output_hidden_states=True)
                embeds.append(out.hidden_states[-2])
                pooled = out[0]  # the last encoder's projected pooled output
        return torch.cat(embeds, dim=-1), pooled

    def unconditional(self, like: Conditioning) -> Conditioning:
        """The empty-prompt conditioning, shaped like `like` (same batch and time ids)."""
        b = like.embeds.shape[0]
        if self.family == "sdxl":
            return Conditioning(torch.zeros_like(like.embeds), torch.zeros_like(like.pooled), like.time_ids)
        if self._uncond is None:
            embeds, _ = self.encode([""])
            self._uncond = Conditioning(embeds)
        return Conditioning(self._uncond.embeds.expand(b, -1, -1).to(like.embeds.device, like.embeds.dtype))

    def conditioning(self, batch: dict[str, Any]) -> Conditioning:
        """The batch's conditioning: precomputed `prompt_embeds` when the shards carry them, else encode captions."""
        if "prompt_embeds" in batch and (self.family == "sd15" or "pooled_prompt_embeds" in batch):
            device = self.text_encoders[0].device if self.text_encoders else torch.device("cpu")
            embeds = torch.as_tensor(batch["prompt_embeds"]).float().to(device)
            pooled = batch.get("pooled_prompt_embeds")
            pooled = None if pooled is None else torch.as_tensor(pooled).float().to(device)
        else:
            embeds, pooled = self.encode(batch["captions"])
        time_ids = None
        if self.family == "sdxl":
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
            time_ids = time_ids.to(embeds.device)
        return Conditioning(embeds, pooled, time_ids)


# --- the LCD step (Algorithm 1, lines 3-6) ------------------------------------------------------


@dataclass
class LCDSample:
    """The random draws of one step: solver index n, noise, guidance w, and the two timesteps."""

    t_start: Tensor  # t_{n+k} [B] (student timestep)
    t_prev: Tensor  # t_n [B] (one solver step earlier; target timestep)
    noise: Tensor  # [B, C, h, w]
    w: Tensor  # [B] guidance in LCM form (CFG scale - 1)


def draw_lcd_sample(latents: Tensor, s: LCDSettings, solver_timesteps: Tensor, generator: torch.Generator) -> LCDSample:
    """Sample n ~ U{0..N-1}, z noise, omega ~ [w_min, w_max] (Algorithm 1, line 3) on the CPU generator."""
    b = latents.shape[0]
    index = torch.randint(0, len(solver_timesteps), (b,), generator=generator)
    t_start = solver_timesteps[index]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    w = lcd.sample_guidance_w(b, s.guidance_min, s.guidance_max, generator)
    dev = latents.device
    return LCDSample(t_start.to(dev), lcd.previous_solver_timestep(t_start, s.skip).to(dev), noise.to(dev, latents.dtype),
                     w.to(dev))


def teacher_solver_step(unet: Any, z_start: Tensor, d: LCDSample, cond: Conditioning, uncond: Conditioning,
                        s: LCDSettings, alpha_bar: Tensor) -> Tensor:
    """z_hat_{t_n} = Psi with guidance (Algorithm 1, line 5): cond and uncond teacher passes as one batched forward.

    `unet` is the unwrapped LoRA UNet; adapters are disabled here so it is the frozen base.
    """
    with torch.no_grad(), adapters_disabled(unet):
        both = cond.cat(uncond)
        z_in = torch.cat([z_start, z_start]).to(both.embeds.dtype)
        out = unet(z_in, torch.cat([d.t_start, d.t_start]), **both.unet_kwargs()).sample
    out = out.float()
    z2, t2 = torch.cat([z_start, z_start]).float(), torch.cat([d.t_start, d.t_start])
    x0_c, x0_u = lcd.predicted_x0(out, z2, t2, alpha_bar, s.prediction_type).chunk(2)
    eps_c, eps_u = lcd.predicted_epsilon(out, z2, t2, alpha_bar, s.prediction_type).chunk(2)
    x0 = lcd.guided(x0_c, x0_u, d.w)
    eps = lcd.guided(eps_c, eps_u, d.w)
    return lcd.ddim_step(x0, eps, d.t_prev, alpha_bar)


def consistency_target(unet: Any, z_prev: Tensor, d: LCDSample, cond: Conditioning, s: LCDSettings,
                       alpha_bar: Tensor) -> Tensor:
    """f_theta-(z_hat_{t_n}, t_n) (Algorithm 1, line 6, right): the LoRA student itself under no_grad."""
    with torch.no_grad():
        out = unet(z_prev.to(cond.embeds.dtype), d.t_prev, **cond.unet_kwargs()).sample.float()
    x0 = lcd.predicted_x0(out, z_prev, d.t_prev, alpha_bar, s.prediction_type)
    c_skip, c_out = lcd.scalings_for_boundary_conditions(d.t_prev, s.sigma_data, s.timestep_scaling)
    return lcd.consistency_function(z_prev, x0, c_skip.to(z_prev.device), c_out.to(z_prev.device))


def student_prediction(unet: Any, z_start: Tensor, d: LCDSample, cond: Conditioning, s: LCDSettings,
                       alpha_bar: Tensor) -> Tensor:
    """f_theta(z_{t_{n+k}}, t_{n+k}) (Algorithm 1, line 6, left), with gradients into the LoRA weights."""
    out = unet(z_start.to(cond.embeds.dtype), d.t_start, **cond.unet_kwargs()).sample.float()
    x0 = lcd.predicted_x0(out, z_start, d.t_start, alpha_bar, s.prediction_type)
    c_skip, c_out = lcd.scalings_for_boundary_conditions(d.t_start, s.sigma_data, s.timestep_scaling)
    return lcd.consistency_function(z_start, x0, c_skip.to(z_start.device), c_out.to(z_start.device))


def lcd_loss(student: Any, unet: Any, latents: Tensor, cond: Conditioning, uncond: Conditioning, s: LCDSettings,
             alpha_bar: Tensor, solver_timesteps: Tensor, generator: torch.Generator) -> Tensor:
    """L(theta, theta-; Psi) of Algorithm 1 for one batch of scaled latents [B, C, h, w]; scalar.

    `student` is the (possibly DDP-wrapped) UNet used for the gradient pass; `unet` the same
    module unwrapped, used for the no-grad teacher and target passes.
    """
    # 1. Draws: n, noise, w; forward process to z_{t_{n+k}} (lines 3-4).
    d = draw_lcd_sample(latents, s, solver_timesteps, generator)
    z_start = lcd.add_noise(latents, d.noise, d.t_start, alpha_bar)
    # 2. Teacher: one guided DDIM step back to t_n (line 5), no gradients, adapters off.
    z_prev = teacher_solver_step(unet, z_start, d, cond, uncond, s, alpha_bar)
    # 3. Target from the same LoRA student under no_grad (no EMA for LoRA).
    target = consistency_target(unet, z_prev, d, cond, s, alpha_bar)
    # 4. Student with gradients last, so no activations are held during the no-grad passes.
    pred = student_prediction(student, z_start, d, cond, s, alpha_bar)
    return lcd.lcd_distance(pred, target, s.loss_type, s.huber_c)


# --- the training loop ---------------------------------------------------------------------


@dataclass(frozen=True)
class StepInfo:
    """Reported to `on_step` after every optimizer step."""

    step: int
    max_steps: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float  # wall time of this step
    samples: int  # samples in this step, all processes


@dataclass
class TrainResult:
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
    seed: int = 0
    cpu: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> TrainOptions:
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


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
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class _TrainerState:
    """Step, CPU generator state and loss history: what accelerate's save_state does not keep."""

    def __init__(self, seed: int, rank: int):
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)

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


def _make_accelerator(opts: TrainOptions, run_dir: Path):
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
    on_step: Callable[[StepInfo], None] | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
) -> TrainResult:
    """Algorithm 1 with LoRA under accelerate until `opts.max_steps`; the UNet must already carry the LoRA adapter.

    `batches(rank, world_size)` returns a fresh iterable of this process's dict batches (the
    contract 3 loader format, e.g. `latent_loader.make_loader`); on resume the
    batches already consumed are skipped, so a resumed run sees the same data as an
    uninterrupted one. `resume`: None, "latest", or a checkpoint folder.
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
    unet.train()
    alpha_bar = alpha_bar.to(device)
    solver_timesteps = lcd.ddim_solver_timesteps(settings.num_train_timesteps, settings.num_ddim_timesteps)

    # 2. Optimizer over the LoRA parameters only; warm-up then constant learning rate.
    params = lora_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=(opts.adam_beta1, opts.adam_beta2),
                                  weight_decay=opts.weight_decay, eps=opts.adam_eps)
    warmup = max(0, opts.lr_warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    student, optimizer, scheduler = accelerator.prepare(unet, optimizer, scheduler)
    _register_lora_checkpoint_hooks(accelerator, unet)

    # 3. Resume: LoRA, optimizer, scheduler, RNG states, generator, history; skip consumed batches.
    state = _TrainerState(opts.seed, accelerator.process_index)
    resumed_from = None
    if resume:
        ckpt = latest_checkpoint(run_dir) if resume == "latest" else Path(resume)
        if ckpt is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {run_dir / CHECKPOINT_DIR}; "
                                    "start without --resume or point --output at the interrupted run")
        accelerator.load_state(str(ckpt))
        state.load(ckpt, accelerator.process_index)
        resumed_from = str(ckpt)
    data = _endless(lambda: batches(accelerator.process_index, accelerator.num_processes))
    if state.step:
        data = itertools.islice(data, state.step, None)
    last_good = resumed_from

    # 4. Steps.
    steps_run, samples_run = 0, 0
    while state.step < opts.max_steps:
        t_step = time.perf_counter()
        batch = next(data)
        latents = torch.as_tensor(batch["latents"]).float().to(device) * settings.scaling_factor
        with accelerator.autocast():
            cond = conditioner.conditioning(batch).to(device, weight_dtype)
            uncond = conditioner.unconditional(cond)
            loss = lcd_loss(student, unet, latents, cond, uncond, settings, alpha_bar, solver_timesteps,
                            state.generator)
        accelerator.backward(loss)
        if opts.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(params, opts.max_grad_norm)
        else:
            grad_norm = torch.zeros((), device=device)
        # One host sync per step: loss (every rank), finiteness and grad norm, gathered together.
        local = torch.stack([loss.detach().float(), torch.isfinite(loss.detach()).float(),
                             torch.as_tensor(grad_norm, device=device).float()])
        stats = accelerator.gather(local.reshape(1, 3)).reshape(-1, 3).cpu()
        loss_value, finite, norm = stats[:, 0].mean().item(), bool(stats[:, 1].min() == 1.0), stats[0, 2].item()
        if not finite:
            raise NonFiniteLoss(
                f"distill: LCD loss is {stats[:, 0].tolist()} at step {state.step + 1} (per process); stopped before "
                f"updating the weights. Last good checkpoint: {last_good or 'none (no checkpoint written yet)'}. "
                "Lower distill.lr, check the latent shards for NaNs, or set distill.mixed_precision=no; then "
                "`lcmlora distill --resume latest`."
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        steps_run += 1
        state.history.append((state.step, loss_value))
        n = latents.shape[0] * accelerator.num_processes
        samples_run += n
        if on_step is not None and accelerator.is_main_process:
            on_step(StepInfo(state.step, opts.max_steps, loss_value, scheduler.get_last_lr()[0],
                             norm, time.perf_counter() - t_step, n))
        if opts.checkpoint_every and state.step % opts.checkpoint_every == 0:
            last_good = str(_save_checkpoint(accelerator, state, run_dir, opts.checkpoints_keep))
            if on_checkpoint is not None and accelerator.is_main_process:
                on_checkpoint(state.step, Path(last_good))

    accelerator.wait_for_everyone()
    from components.lora import unet_lora_state_dict

    lora_sd = unet_lora_state_dict(accelerator.unwrap_model(student))
    seconds = time.perf_counter() - t0
    return TrainResult(
        steps=state.step, history=list(state.history), lora_state_dict=lora_sd, seconds=seconds,
        resumed_from=resumed_from, world_size=accelerator.num_processes, is_main_process=accelerator.is_main_process,
        mixed_precision=accelerator.mixed_precision, device=str(device),
        samples_per_second=samples_run / seconds if seconds > 0 else 0.0,
    )


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
