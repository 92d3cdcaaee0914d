"""Encoding throughput against the bare VAE encode of the same batches, in the same run.

    .venv/bin/python bench/bench_encode.py --images 64 --resolution 128          # CPU, quick
    .venv/bin/python bench/bench_encode.py --device cuda --dtype float16 \\
        --images 2048 --resolution 512 --batch-size 32 --workers 12               # GPU, goal >= 0.9

Builds an img2dataset-style source of JPEGs of varied size and aspect around the resolution
(tars + a manifest parquet, as curation leaves them), and a VAE with the SD-1.5 architecture
from `data/arch/sd15/vae` (random weights: the cost of a VAE does not depend on its values).
Then, alternating, twice each:

- **bare**: the VAE alone (`encode_latent_mean`) over the very batches the pipeline encodes,
  already decoded, cropped and resident on the device: the ceiling.
- **pipeline**: `encode_dataset` end to end (tar reading, JPEG decoding, resize and crop in
  threads, VAE, fp16 conversion, tar serialization and storage writes, index), into a fresh
  folder each time.

Prints samples/s of each and the ratio pipeline / bare (the median of each is used).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.data.encode import DTYPES, encode_dataset, encode_latent_mean, plan_shards
from components.data.image_prep import decode_image, resize_and_crop, to_model_input
from components.storage.storage import Storage

PER_TAR = 1000


def make_source(folder: Path, images: int, resolution: int, seed: int = 0) -> Storage:
    """JPEGs (smooth random content, shorter side 1-1.5x resolution, aspect up to 1.6) in tars,
    and the manifest rows pointing at them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, images, PER_TAR):
        shard = f"{start // PER_TAR:05d}.tar"
        with tarfile.open(folder / shard, "w") as tar:
            for i in range(start, min(images, start + PER_TAR)):
                short = int(resolution * rng.uniform(1.0, 1.5))
                long = int(short * rng.uniform(1.0, 1.6))
                w, h = (long, short) if rng.random() < 0.5 else (short, long)
                small = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                key = f"{i:09d}"
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
                rows.append({"key": key, "caption": f"synthetic image {i}", "shard": shard, "member": f"{key}.jpg"})
    out = Storage(str(folder.parent / "root"))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    out.write_bytes("curated/manifest.parquet", buf.getvalue())
    return Storage(str(folder))


def sd_vae(arch: Path, dtype: torch.dtype, device: str):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = json.loads((arch / "vae" / "config.json").read_text())
    return AutoencoderKL.from_config(config).to(device=device, dtype=dtype).eval()


def staged_batches(source: Storage, root: Storage, resolution: int, batch_size: int, shard_size: int,
                   device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """The pipeline's own batches (same plan, same order), decoded and on the device."""
    manifest = pq.read_table(io.BytesIO(root.read_bytes("curated/manifest.parquet")))
    batches = []
    blobs: dict[str, bytes] = {}
    for shard in sorted({r for r in manifest["shard"].to_pylist()}):
        with tarfile.open(source.url(shard)) as tar:
            for m in tar.getmembers():
                blobs[m.name] = tar.extractfile(m).read()
    for plan in plan_shards(manifest, shard_size):
        for s in range(0, len(plan.rows), batch_size):
            pixels = np.stack([resize_and_crop(decode_image(blobs[r["member"]]), resolution)[0]
                               for r in plan.rows[s:s + batch_size]])
            batches.append(to_model_input(pixels, device, dtype))
    return batches


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare(vae, batches: list[torch.Tensor], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for x in batches:
        encode_latent_mean(vae, x)
    sync(device)
    return sum(len(x) for x in batches) / (time.perf_counter() - start)


def pipeline(vae, fp: str, source: Storage, root: Storage, args, run: int) -> tuple[float, dict]:
    start = time.perf_counter()
    result = encode_dataset(root, "curated/manifest.parquet", source, vae, fp, resolution=args.resolution,
                            output=f"latents-run{run}", batch_size=args.batch_size, shard_size=args.shard_size,
                            device=args.device, dtype=args.dtype, workers=args.workers)
    sync(args.device)
    seconds = time.perf_counter() - start
    return result.samples / seconds, {"seconds": round(seconds, 3), "vae_seconds": round(result.vae_seconds, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=str(REPO / "data" / "arch" / "sd15"), help="folder with vae/config.json")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="decode/resize threads (encode.workers)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()

    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory(prefix="lcmlora-bench-encode-") as tmp:
        t = time.perf_counter()
        source = make_source(Path(tmp) / "source", args.images, args.resolution)
        root = Storage(str(Path(tmp) / "root"))
        print(f"source: {args.images} JPEGs in {time.perf_counter() - t:.1f}s", flush=True)
        vae = sd_vae(Path(args.arch), dtype, args.device)
        batches = staged_batches(source, root, args.resolution, args.batch_size, args.shard_size, args.device, dtype)
        bare(vae, batches[:2], args.device)  # warm-up (allocator, kernels, autotuning)
        bare_rates, pipe_rates, details = [], [], []
        for run in range(args.repeat):
            bare_rates.append(bare(vae, batches, args.device))
            rate, info = pipeline(vae, "bench", source, root, args, run)
            pipe_rates.append(rate)
            details.append(info)
            print(f"run {run}: bare {bare_rates[-1]:.1f} samples/s, pipeline {rate:.1f} samples/s {info}", flush=True)
    result = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": args.dtype, "images": args.images, "resolution": args.resolution, "batch_size": args.batch_size,
        "workers": args.workers, "torch_threads": torch.get_num_threads(),
        "bare_samples_per_s": [round(r, 2) for r in bare_rates],
        "pipeline_samples_per_s": [round(r, 2) for r in pipe_rates],
        "ratio": round(statistics.median(pipe_rates) / statistics.median(bare_rates), 3),
        "runs": details,
    }
    print(json.dumps(result, indent=1))
    print(f"ratio pipeline/bare = {result['ratio']:.3f} (goal >= 0.9)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
