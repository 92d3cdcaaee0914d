"""Step-time breakdown of LCD-LoRA distillation and its overhead over the bare UNet passes.

    # CPU, the toy base (data/toy/base; the toy architecture with random weights if absent):
    python bench/bench_distill_step.py
    # GPU, SD-1.5 architecture at 512 px, random weights, bf16, batch 8:
    python bench/bench_distill_step.py --arch data/arch/sd15 --resolution 512 --batch 8 --bf16 \
        --device cuda --random-weights

One LCD step holds three UNet passes: the teacher (adapters off, cond + uncond batched, 2B,
no grad), the target (LoRA on, B, no grad) and the student (LoRA on, B, forward + backward).
In the same run this script times
  1. the real training loop (`components.distill.trainer.train_lcd_lora`): median step time,
  2. an instrumented step split into data, teacher, target, student fwd+bwd and optimizer,
  3. the bare UNet passes alone on the same inputs,
interleaved in time (2 and 3 run in the loop's progress callback, outside its timed step), and
prints overhead = loop step time / sum of bare passes (median of per-step ratios; goal <= 1.15),
samples/s and, on CUDA, peak memory. Needs only torch, diffusers, peft, accelerate and this repository.

MFU (every row): the FLOPs of one real LCD step (teacher, target, student forward and backward,
counted by torch.utils.flop_counter.FlopCounterMode) x steps/s / the matmul peak measured in the
same run (a large torch.matmul loop, bf16 on CUDA with --bf16, fp32 otherwise).

Speed-ups: `--opt optimizer=adamw_fused --opt sync_every=10 --opt prefetch=2 --opt compile_unet=true`
(TrainOptions fields); with `--loop-only` only the loop runs (steady-state time between step
reports), as deferred syncs and compilation need. `--batch-scan 8,16,32` runs the script once
per batch in fresh processes and prints the best batch that fits.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components.config import DistillConfig
from components.distill import lcd
from components.distill.lcd import (
    LCDSettings,
    consistency_target,
    draw_lcd_sample,
    student_prediction,
    teacher_solver_step,
)
from components.distill.trainer import TrainOptions, train_lcd_lora
from components.lora.adapter import (
    adapters_disabled,
    add_lora,
    lora_config,
    lora_parameters,
    trainable_parameters,
)
from components.models.conditioning import TextConditioner


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Achieved matmul FLOP/s: a square torch.matmul loop (n = 8192 on CUDA, 1024 on CPU) for ~`seconds`."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        iters += 10
        sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def step_flops(unet, conditioner, batch, settings, alpha_bar, device, dtype, autocast) -> int:
    """FLOPs of one LCD step (lcd_loss forward + backward), counted by FlopCounterMode; grads cleared after."""
    from torch.utils.flop_counter import FlopCounterMode

    solver = lcd.ddim_solver_timesteps(settings.num_train_timesteps, settings.num_ddim_timesteps)
    lat = batch["latents"].to(device) * settings.scaling_factor
    counter = FlopCounterMode(display=False)
    with counter, autocast:
        c = conditioner.conditioning(batch).to(device, dtype)
        loss = lcd.lcd_loss(unet, unet, lat, c, conditioner.unconditional(c), settings, alpha_bar.to(device), solver,
                            torch.Generator().manual_seed(123))
        loss.backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def sdpa_report(unet, z, t, c, device) -> str:
    """Attention processors in use and, on CUDA, whether a forward runs with the flash SDPA kernel alone."""
    procs = sorted({type(m.processor).__name__ for m in unet.modules() if hasattr(m, "processor")})
    note = f"attention processors {procs}"
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                unet(z, t, **c.unet_kwargs())
            note += "; flash SDPA: used (forward ran with the flash kernel only)"
        except RuntimeError as exc:
            note += f"; flash SDPA: NOT usable ({str(exc).splitlines()[0][:120]})"
    return note


def batch_scan(args: argparse.Namespace, argv: list[str]) -> None:
    """One fresh process per batch size; the best samples/s among those that fit."""
    rows = []
    for b in [int(x) for x in args.batch_scan.split(",")]:
        out = Path(tempfile.gettempdir()) / f"bench_distill_b{b}.json"
        out.unlink(missing_ok=True)
        rest = [a for i, a in enumerate(argv) if a != "--batch-scan" and (i == 0 or argv[i - 1] != "--batch-scan")]
        rc = subprocess.run([sys.executable, __file__, *rest, "--batch", str(b), "--json", str(out)],
                            check=False).returncode
        if rc or not out.exists():
            print(f"batch {b}: failed (rc {rc}; out of memory?)")
            rows.append((b, None))
            continue
        r = json.loads(out.read_text())
        rows.append((b, r))
    fit = [(b, r) for b, r in rows if r]
    print("\nbatch scan: " + " | ".join(
        f"{b}: {r['samples_per_s']:.2f} samples/s, MFU {r['mfu']:.1%}, peak {r['peak_memory_gib'] or 0:.1f} GiB"
        if r else f"{b}: did not fit" for b, r in rows))
    if fit:
        b, r = max(fit, key=lambda x: x[1]["samples_per_s"])
        print(f"best batch {b}: {r['samples_per_s']:.2f} samples/s, MFU {r['mfu']:.1%}")


def parse_opt(text: str) -> tuple[str, object]:
    """key=value -> (key, bool | int | str) for a TrainOptions field."""
    key, value = text.split("=", 1)
    low = value.lower()
    return key, (low == "true") if low in ("true", "false") else int(value) if value.isdigit() else value


def build(args: argparse.Namespace):
    """(unet, conditioner, family, scheduler config, scaling factor, latent shape, description)."""
    if args.random_weights or args.arch:
        from diffusers import UNet2DConditionModel

        from components.lora.adapter import unet_config

        arch = Path(args.arch or REPO / "data" / "arch" / "sd15")
        config = unet_config(arch)
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(config)
        family = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
        sched = json.loads((arch / "scheduler" / "scheduler_config.json").read_text())
        vae = json.loads((arch / "vae" / "config.json").read_text())
        down = 2 ** (len(vae["block_out_channels"]) - 1)
        uncond = torch.zeros(1, 77, config["cross_attention_dim"])
        cond = TextConditioner(family, [], [], uncond_embeds=uncond)
        shape = (config["in_channels"], args.resolution // down, args.resolution // down)
        return unet, cond, family, sched, float(vae.get("scaling_factor", 0.18215)), shape, f"{arch} (random weights)"
    toy = REPO / "data" / "toy" / "base"
    if (toy / "model_index.json").exists():
        from components.models.base_model import load_base

        pipe = load_base(str(toy)).pipe
        desc = "data/toy/base"
    else:
        from components.toy.sdxl import build_tiny_sd15_pipeline

        pipe = build_tiny_sd15_pipeline(seed=0)
        desc = "toy architecture, random weights (data/toy/base not built)"
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    return (pipe.unet, TextConditioner.from_pipeline(pipe, "sd15"), "sd15", dict(pipe.scheduler.config),
            float(pipe.vae.config.scaling_factor), shape, desc)


def make_batches(args, family: str, shape, unet_config, n: int):
    """Loader-format batches (CPU tensors); embeddings precomputed for random-weight runs, captions otherwise."""
    g = torch.Generator().manual_seed(0)
    b = args.batch
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    batches = []
    for i in range(n):
        batch = {"latents": torch.randn(b, *shape, generator=g), "original_size": torch.tensor([[args.resolution] * 2] * b),
                 "crop_top_left": torch.zeros(b, 2, dtype=torch.long), "target_size": torch.tensor([[args.resolution] * 2] * b),
                 "captions": [f"a handwritten digit {words[(i + j) % 10]}" for j in range(b)]}
        if args.random_weights or args.arch:
            batch["prompt_embeds"] = torch.randn(b, 77, unet_config.cross_attention_dim, generator=g)
            if family == "sdxl":
                pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
                batch["pooled_prompt_embeds"] = torch.randn(b, pooled, generator=g)
        batches.append(batch)
    return batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", help="diffusers config folder (data/arch/sd15, ...); default: the toy base")
    ap.add_argument("--random-weights", action="store_true", help="random-init UNet from --arch (no weights needed)")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=DistillConfig().lora_rank)
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (frozen base in bf16, LoRA fp32)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=12, help="timed steps of each kind (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--opt", action="append", default=[], help="TrainOptions speed-up, key=value (repeatable)")
    ap.add_argument("--loop-only", action="store_true", help="time the loop alone (no instrumented/bare passes)")
    ap.add_argument("--batch-scan", help="comma-separated batch sizes: one fresh process each, best that fits")
    args = ap.parse_args()
    if args.batch_scan:
        return batch_scan(args, sys.argv[1:])

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    torch.manual_seed(0)
    unet, conditioner, family, sched, scaling, shape, desc = build(args)
    dcfg = DistillConfig()
    add_lora(unet, lora_config(args.rank, args.rank, dcfg.target_modules))
    n_lora = trainable_parameters(unet)
    settings = LCDSettings(family=family, prediction_type=sched.get("prediction_type", "epsilon"), scaling_factor=scaling,
                           guidance_min=7.5 if args.arch else 2.0, guidance_max=7.5 if args.arch else 2.0)
    alpha_bar = lcd.schedule_from_scheduler_config(sched)
    n_steps = args.warmup + args.steps
    batches = make_batches(args, family, shape, unet.config, n_steps)

    # The three measurements are interleaved in time (the instrumented step and the bare passes
    # run inside the loop's on_step callback, outside its timed step), so load changes on a
    # shared machine hit all of them alike.
    alpha_bar_d = alpha_bar.to(device)
    solver = lcd.ddim_solver_timesteps(settings.num_train_timesteps, settings.num_ddim_timesteps)
    params = lora_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-9)  # the instrumented step's own optimizer
    gen = torch.Generator().manual_seed(1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    phases: dict[str, list[float]] = {k: [] for k in ("data", "teacher", "target", "student_fwd_bwd", "optimizer")}
    bare: dict[str, list[float]] = {"teacher": [], "target": [], "student": []}
    step_times: list[float] = []
    fixed: dict = {}

    def instrumented_step(i: int) -> list[float]:
        """2. One step through the same functions, each phase timed with device syncs."""
        def data():
            batch = batches[i]
            lat = batch["latents"].to(device) * scaling
            with autocast:
                c = conditioner.conditioning(batch).to(device, dtype)
                return lat, c, conditioner.unconditional(c)
        (lat, c, u), t_data = timed(data, device)
        d = draw_lcd_sample(lat, settings, solver, gen)
        z = lcd.add_noise(lat, d.noise, d.t_start, alpha_bar_d)
        with autocast:
            z_prev, t_teacher = timed(lambda: teacher_solver_step(unet, z, d, c, u, settings, alpha_bar_d), device)
            target, t_target = timed(lambda: consistency_target(unet, z_prev, d, c, settings, alpha_bar_d), device)

            def student():
                pred = student_prediction(unet, z, d, c, settings, alpha_bar_d)
                lcd.lcd_distance(pred, target, settings.loss_type, settings.huber_c).backward()
            _, t_student = timed(student, device)

        def opt():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _, t_opt = timed(opt, device)
        if not fixed:
            fixed.update(z=z.to(dtype), t=d.t_start, c=c, u=u)
        return [t_data, t_teacher, t_target, t_student, t_opt]

    def bare_passes() -> list[float]:
        """3. Exactly the three UNet calls a step makes, on fixed inputs, nothing around them."""
        z, t, c, u = fixed["z"], fixed["t"], fixed["c"], fixed["u"]
        both, z2, t2 = c.cat(u), torch.cat([z, z]), torch.cat([t, t])
        with autocast:
            def teacher():
                with torch.no_grad(), adapters_disabled(unet):
                    unet(z2, t2, **both.unet_kwargs())

            def target_pass():
                with torch.no_grad():
                    unet(z, t, **c.unet_kwargs())

            def student_pass():
                unet(z, t, **c.unet_kwargs()).sample.float().square().mean().backward()
            return [timed(f, device)[1] for f in (teacher, target_pass, student_pass)]

    stamps: dict[int, float] = {}
    flops = step_flops(unet, conditioner, batches[0], settings, alpha_bar, device, dtype, autocast)
    peak_flops = matmul_peak(device, dtype)

    def on_step(info) -> None:
        """1. The real loop's step time; then, outside it, one instrumented step and the bare passes."""
        if info.note:  # a checkpoint notice, not a step
            return
        stamps[info.step] = time.perf_counter()
        if args.loop_only:
            return
        i = info.step - 1
        phase_times = instrumented_step(i)
        bare_times = bare_passes()
        unet.zero_grad(set_to_none=True)  # leave no gradient behind for the loop's next backward
        if i >= args.warmup:
            step_times.append(info.metrics["step_seconds"])
            for k, v in zip(phases, phase_times):
                phases[k].append(v)
            for k, v in zip(bare, bare_times):
                bare[k].append(v)

    opts = TrainOptions(max_steps=n_steps, mixed_precision="bf16" if args.bf16 else "no",
                        gradient_checkpointing=args.gradient_checkpointing, cpu=device.type == "cpu",
                        **dict(parse_opt(o) for o in args.opt))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        train_lcd_lora(unet, conditioner, lambda r, w: batches, settings, alpha_bar, opts, tmp, progress=on_step)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if fixed:
        sdpa = sdpa_report(unet, fixed["z"], fixed["t"], fixed["c"], device)
    else:  # --loop-only: a batch of the loop's shapes
        sdpa = sdpa_report(unet, torch.randn(args.batch, *shape, device=device, dtype=dtype),
                           torch.full((args.batch,), 500, device=device),
                           conditioner.conditioning(batches[0]).to(device, dtype), device)
    if args.loop_only:  # steady state between step reports (deferred syncs report in bursts)
        loop_step = (stamps[n_steps] - stamps[args.warmup]) / args.steps
        step_times = [loop_step]
        med = {k: 0.0 for k in phases}
        bare_med = {k: float("nan") for k in bare}
        ratios = [float("nan")]
    else:
        loop_step = statistics.median(step_times)
        ratios = [s_ / (a + b + c) for s_, a, b, c in zip(step_times, bare["teacher"], bare["target"], bare["student"])]
        med = {k: statistics.median(v) for k, v in phases.items()}
        bare_med = {k: statistics.median(v) for k, v in bare.items()}
    bare_sum = sum(bare_med.values())
    mfu = flops / loop_step / peak_flops
    result = {
        "base": desc, "family": family, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "batch": args.batch, "resolution": args.resolution,
        "latent_shape": list(shape), "lora_rank": args.rank, "lora_params": n_lora, "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "loop_step_s": loop_step, "samples_per_s": args.batch / loop_step,
        "breakdown_s": med, "instrumented_step_s": sum(med.values()),
        "bare_passes_s": bare_med, "bare_sum_s": bare_sum, "overhead_ratio": statistics.median(ratios),
        "overhead_ratio_of_medians": loop_step / bare_sum,
        "peak_memory_gib": peak, "step_tflop": flops / 1e12, "matmul_peak_tflops": peak_flops / 1e12, "mfu": mfu,
        "options": dict(parse_opt(o) for o in args.opt), "loop_only": args.loop_only, "sdpa": sdpa,
    }
    print(f"base {desc} | {family} | {result['device_name']} | batch {args.batch} | latents {tuple(shape)} | "
          f"LoRA rank {args.rank} ({n_lora:,} params) | {'bf16' if args.bf16 else 'fp32'}")
    print("instrumented step (median s): " + ", ".join(f"{k} {v:.4f}" for k, v in med.items()) +
          f" | sum {sum(med.values()):.4f}")
    print("bare UNet passes (median s): " + ", ".join(f"{k} {v:.4f}" for k, v in bare_med.items()) +
          f" | sum {bare_sum:.4f}")
    print(f"training loop step: {loop_step:.4f} s -> {result['samples_per_s']:.2f} samples/s; "
          f"overhead ratio loop / bare = {result['overhead_ratio']:.3f} (median of per-step ratios; goal <= 1.15)")
    print(f"MFU: step {flops / 1e9:.2f} GFLOP x {1 / loop_step:.3f} steps/s / matmul peak "
          f"{peak_flops / 1e9:.1f} GFLOP/s ({'bf16' if args.bf16 else 'fp32'}, same run) = {mfu:.1%}"
          + (f" | options {result['options']}" if args.opt else ""))
    if sdpa:
        print(sdpa)
    if peak is not None:
        print(f"peak memory: {peak:.2f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
