"""Teacher-generated data: a model's own samples, drawn with its recommended many-step sampler,
written as a LAION/img2dataset source (components/data/laion_source.py) that curation reads unchanged.

    plan = plan_images(prompts, count=1000, seed=0)   # image i: prompts[i % len(prompts)], seed + i
    for batch in batches(plan, batch_size):
        pixels = sample_batch(pipe, batch, settings)  # DPM-Solver++, the base's CFG
        files = shard_files(shard_id, batch, pixels, ...)   # NNNNN.tar, NNNNN_stats.json, NNNNN.parquet

Image i starts from latent noise seeded by its own seed alone, so a batch gives the same pixels
whichever run samples it (a resumed run redoes only the batches it lacks). A style LoRA is fused
into the weights first (`fuse_adapter`: theta_pre + l1 tau_style, LCM-LoRA report eq. 4 with
l2 = 0); the fused model has its own fingerprints (`fingerprints_of`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from components.data.laion_source import (
    METADATA_COLUMNS,
    metadata_bytes,
    metadata_table,
    sample_json,
    shard_stats,
    tar_bytes,
)

Scheduler = Literal["dpmsolver++", "ddim"]
# The LAION score columns of every synthesized image. The samples are not scored (no CLIP, aesthetic,
# watermark or safety model runs): they are the model's own distribution, which distillation is to
# match, so they carry values that pass curation's filters and its gate (similarity is a cosine).
UNSCORED: dict[str, float] = {"similarity": 1.0, "punsafe": 0.0, "pwatermark": 0.0, "AESTHETIC_SCORE": 10.0}
SYNTH_COLUMNS = {**METADATA_COLUMNS, "seed": pa.int64()}  # the metadata, and each image's noise seed
NOISE_SEED_OFFSET = 1_000_003  # the generator a sampler draws from, apart from the initial noise (as evaluation)


@dataclass(frozen=True)
class SamplerSettings:
    """How every image is sampled."""

    scheduler: Scheduler  # dpmsolver++: DPM-Solver++ (2M); ddim: DDIM
    steps: int
    guidance_scale: float  # classifier-free guidance (1.0: no unconditional pass)
    resolution: int  # height = width, pixels
    timestep_spacing: str | None = None  # None: the base scheduler's own

    def as_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "resolution": self.resolution, "timestep_spacing": self.timestep_spacing}


@dataclass(frozen=True)
class PlannedImage:
    """One image to sample: its position, its prompt (the caption it gets) and its noise seed."""

    index: int
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        """Its sample key in the source: 9 digits, img2dataset's width."""
        return f"{self.index:09d}"


def plan_images(prompts: Sequence[str], count: int, seed: int) -> list[PlannedImage]:
    """`count` images: image i gets prompts[i % len(prompts)] (the prompts in order, cycled) and seed + i."""
    if not prompts:
        raise ValueError("synthesize: no prompts to sample from; give a prompt file (synthesize.prompts) "
                         "or a curated manifest with captions")
    return [PlannedImage(i, prompts[i % len(prompts)], seed + i) for i in range(count)]


def batches(plan: Sequence[PlannedImage], batch_size: int) -> list[list[PlannedImage]]:
    """The plan in consecutive batches of `batch_size` (the last one shorter): one shard each."""
    return [list(plan[i:i + batch_size]) for i in range(0, len(plan), batch_size)]


def make_scheduler(name: Scheduler, base_config: Any, timestep_spacing: str | None = None):
    """A fresh scheduler from the base's scheduler config.

    The same schedulers as `components/evaluate/sampler_matrix.py` `make_scheduler` (dpmpp, ddim);
    the data layer cannot import evaluation.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    from diffusers.utils import logging as diffusers_logging

    spacing = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the base's keys the new class does not use are expected
    try:
        if name == "dpmsolver++":
            return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++", solver_order=2,
                                                           **spacing)
        if name == "ddim":
            return DDIMScheduler.from_config(base_config, **spacing)
    finally:
        diffusers_logging.set_verbosity(level)
    raise ValueError(f"synthesize.scheduler {name!r}: expected dpmsolver++ or ddim")


# Copied from components/evaluate/sampler_matrix.py `initial_noise` (the data layer cannot import it).
def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Latent noise N x C x h x w; row i depends only on seeds[i] (float32, CPU)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def sample_batch(pipe: Any, images: Sequence[PlannedImage], settings: SamplerSettings) -> np.ndarray:
    """Sample one batch: N x H x W x 3 uint8 pixels, image i from the noise of images[i].seed alone."""
    # 1. The sampler, built from the pipeline's own scheduler config; the pipeline's is put back after.
    base_scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(settings.scheduler, base_scheduler.config, settings.timestep_spacing)
    pipe.set_progress_bar_config(disable=True)
    factor = pipe.vae_scale_factor
    if settings.resolution % factor:
        raise ValueError(f"resolution {settings.resolution} is not a multiple of the VAE factor {factor}")
    side = settings.resolution // factor
    noise = initial_noise([im.seed for im in images], (pipe.unet.config.in_channels, side, side))
    # CPU generators on every device: the same draws on CPU and GPU.
    generators = [torch.Generator().manual_seed(im.seed + NOISE_SEED_OFFSET) for im in images]
    try:
        # 2. One pipeline call for the whole batch (a GPU's batch), CFG at the settings' scale.
        with torch.no_grad():
            out = pipe(prompt=[im.prompt for im in images], num_inference_steps=settings.steps,
                       guidance_scale=settings.guidance_scale,
                       latents=noise.to(pipe.unet.device, pipe.unet.dtype), generator=generators,
                       height=settings.resolution, width=settings.resolution, output_type="np")
    finally:
        pipe.scheduler = base_scheduler
    # 3. As diffusers' numpy_to_pil rounds: [0, 1] -> uint8.
    return (np.clip(np.asarray(out.images, dtype=np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def fuse_adapter(pipe: Any, adapter_name: str, weight: float) -> None:
    """Fuse a loaded LoRA adapter into the weights at `weight` (l1) and drop the adapter: theta_pre + l1 tau."""
    pipe.fuse_lora(lora_scale=weight, adapter_names=[adapter_name])
    pipe.unload_lora_weights()  # the fused deltas stay in the weights; the LoRA layers go


def png_bytes(pixels: np.ndarray) -> bytes:
    """H x W x 3 uint8 as PNG (lossless: the teacher's pixels, exactly)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def shard_name(shard_id: int) -> str:
    """The shard's tar name; its stats and metadata share the stem (img2dataset's layout)."""
    return f"{shard_id:05d}.tar"


def shard_files(shard_id: int, images: Sequence[PlannedImage], pixels: np.ndarray, *, url_prefix: str,
                sample_meta: dict[str, Any]) -> dict[str, bytes]:
    """One batch as source files, in the order to write them (the metadata last: it marks the shard done).

    NNNNN.tar holds KEY.png, KEY.txt (the prompt) and KEY.json (the row, its seed and `sample_meta`:
    model and sampler); NNNNN.parquet is the batch's metadata rows (`SYNTH_COLUMNS`).
    """
    shard = shard_name(shard_id)
    records, members = [], []
    for image, array in zip(images, pixels, strict=True):
        height, width = array.shape[:2]
        record = {"key": image.key, "shard": shard, "URL": f"{url_prefix}/{image.key}.png", "TEXT": image.prompt,
                  "WIDTH": width, "HEIGHT": height, **UNSCORED, "status": "success", "original_width": width,
                  "original_height": height, "seed": image.seed}
        records.append(record)
        members += [(f"{image.key}.png", png_bytes(array)), (f"{image.key}.txt", image.prompt.encode()),
                    (f"{image.key}.json", sample_json({**record, "synthesize": sample_meta}))]
    return {shard: tar_bytes(members), f"{shard[:-4]}_stats.json": shard_stats(len(records)).encode(),
            f"{shard[:-4]}.parquet": metadata_bytes(metadata_table(records, SYNTH_COLUMNS))}
