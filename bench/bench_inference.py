"""End to end text-to-image: 4-step LCM-LoRA against 25-step DPM-Solver++ with CFG, images/s, one run.

    OMP_NUM_THREADS=1 python bench/bench_inference.py                       # CPU, the toy base
    python bench/bench_inference.py --arch data/arch/sd15 --resolution 512 --device cuda --dtype bfloat16
    python bench/bench_inference.py --arch data/arch/sdxl --resolution 1024 --device cuda --dtype bfloat16

Both sides are the whole pipeline call (text encoding, UNet steps, VAE decode) on the same base,
batch and resolution, alternating `--repeat` times after a warm-up call each; images/s is the
median. LCM side: LCMScheduler, 4 steps, guidance 1 (no CFG pass), the LCM-LoRA fused into the
UNet (after fusing, a LoRA costs nothing at sampling, so the base UNet's cost is the LCM's).
DPM side: DPMSolverMultistepScheduler (DPM-Solver++ 2M), 25 steps, CFG at the base's scale
(cond + uncond passes). `--arch` builds random-weight pipelines of the real architectures from
data/arch (tokenizer: the toy's CLIP tokenizer, for both SDXL tokenizers).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def random_pipeline(arch: Path, tokenizer: Path, dtype: torch.dtype):
    """A diffusers pipeline of `arch`'s configs with random weights (SD-1.5 or SDXL family)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(0)
    cfg = lambda sub: json.loads((arch / sub / "config.json").read_text())
    unet = UNet2DConditionModel.from_config(cfg("unet")).to(dtype)
    vae = AutoencoderKL.from_config(cfg("vae")).to(dtype)
    tok = CLIPTokenizer.from_pretrained(str(tokenizer))
    te = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder"))).to(dtype)
    sched = DDPMScheduler.from_config(json.loads((arch / "scheduler" / "scheduler_config.json").read_text()))
    if (arch / "text_encoder_2").exists():
        from diffusers import StableDiffusionXLPipeline

        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2"))).to(dtype)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                         unet=unet, scheduler=sched), 5.0
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False), 7.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(REPO / "data" / "toy" / "base"))
    ap.add_argument("--arch", help="data/arch/sd15 or data/arch/sdxl: random weights instead of --base")
    ap.add_argument("--tokenizer", default=str(REPO / "data" / "toy" / "base" / "tokenizer"))
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--json")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if args.arch:
        pipe, guidance = random_pipeline(Path(args.arch), Path(args.tokenizer), dtype)
        desc = f"{args.arch} (random weights)"
    else:
        from components.models.base_model import load_base

        pipe, guidance, desc = load_base(args.base).pipe, 2.0, args.base
        training = Path(args.base) / "training.json"
        if training.exists():
            guidance = float(json.loads(training.read_text()).get("guidance_scale", guidance))
        pipe.to(dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    res = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    base_sched = dict(pipe.scheduler.config)
    lcm = LCMScheduler.from_config(base_sched)
    dpm = DPMSolverMultistepScheduler.from_config(base_sched, algorithm_type="dpmsolver++", solver_order=2)
    prompts = ["a handwritten digit seven"] * args.batch
    sides = {"lcm4": (lcm, 4, 1.0), "dpmpp25_cfg": (dpm, 25, guidance)}

    def call(name: str) -> float:
        sched, steps, scale = sides[name]
        pipe.scheduler = sched
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(prompts, num_inference_steps=steps, guidance_scale=scale, height=res, width=res,
                 generator=torch.Generator().manual_seed(0), output_type="np")
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.batch / (time.perf_counter() - t0)

    for name in sides:  # warm-up
        call(name)
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.repeat):
        for name in sides:
            rates[name].append(call(name))
    med = {k: statistics.median(v) for k, v in rates.items()}
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{name} | {desc} | {res}px | batch {args.batch} | {args.dtype} | CFG scale {guidance}")
    for k, v in rates.items():
        print(f"{k:>12}: {med[k]:.3f} images/s (runs {', '.join(f'{x:.3f}' for x in v)})")
    ratio = med["lcm4"] / med["dpmpp25_cfg"]
    print(f"LCM 4-step / DPM-Solver++ 25-step CFG: x{ratio:.1f} (goal >= 10 on GPU)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "base": desc, "resolution": res, "batch": args.batch,
                                               "dtype": args.dtype, "images_per_s": med, "runs": rates,
                                               "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
