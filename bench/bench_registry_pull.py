"""Registry pull vs plain boto3 download of the same objects, from SeaweedFS on loopback.

A ~400 MB version (the size of an SDXL LCM-LoRA) is published once; then, alternating, a
cold `Registry.pull` (sha256 verification of every file, content-addressed cache, atomic
folder) and a plain `boto3` `download_file` of the same objects (what `aws s3 cp` does,
no verification). Prints both medians and their ratio (goal: pull <= 1.2 x boto3).

    .venv/bin/python bench/bench_registry_pull.py                 # starts its own SeaweedFS
    .venv/bin/python bench/bench_registry_pull.py --mb 100 --repeats 3
    .venv/bin/python bench/bench_registry_pull.py --endpoint http://127.0.0.1:8333 --bucket b
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.registry.registry import Registry
from components.storage.storage import Storage


def make_version_folder(folder: Path, megabytes: int) -> Path:
    """A LoRA-shaped folder whose weights file is `megabytes` MB of incompressible data."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"lora_weights": rng.integers(0, 256, size=megabytes * 1024 * 1024, dtype=np.uint8)},
              str(folder / "pytorch_lora_weights.safetensors"))
    (folder / "metrics.json").write_text(json.dumps({"gate": {"passed": True, "violations": []}}))
    (folder / "lineage.json").write_text(json.dumps({"base": {"reference": "stabilityai/sdxl", "family": "sdxl"}}))
    return folder


def boto3_download(storage: Storage, keys: list[str], dest: Path) -> None:
    """Plain boto3 `download_file` with its defaults (10 threads, 8 MB parts), no checks."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=storage.endpoint_url, region_name="us-east-1",
                          config=Config(request_checksum_calculation="when_required",
                                        response_checksum_validation="when_required",
                                        s3={"addressing_style": "path"}))
    for key in keys:
        out = dest / key.rsplit("/", 1)[-1]
        client.download_file(storage.bucket, key, str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=400, help="size of the weights file in MB")
    ap.add_argument("--repeats", type=int, default=7, help="timed pulls and downloads each")
    ap.add_argument("--endpoint", default=None, help="use this S3 endpoint instead of starting SeaweedFS")
    ap.add_argument("--bucket", default="bench-registry", help="bucket (created if missing)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    load_start = os.getloadavg()[0]
    server = None
    try:
        # 1. A SeaweedFS on loopback (the test fixture's launcher) unless an endpoint is given.
        if args.endpoint is None:
            from tests.conftest import start_seaweedfs

            server = start_seaweedfs(work / "seaweedfs")
            os.environ.update(server.env)
            endpoint = server.endpoint_url
        else:
            endpoint = args.endpoint
        storage = Storage(f"s3://{args.bucket}/registry", endpoint_url=endpoint)
        if server is not None:
            server.make_bucket(args.bucket)

        # 2. Publish one version of the given size.
        folder = make_version_folder(work / "lora", args.mb)
        registry = Registry(storage, cache_dir=work / "cache")
        t0 = time.perf_counter()
        manifest = registry.publish(folder, "bench-lcm-lora")
        publish_s = time.perf_counter() - t0
        total_mb = manifest.total_size / 1e6
        keys = [storage.key(f"bench-lcm-lora/versions/{manifest.version}/{rel}") for rel in manifest.files]

        # 3. Pairs of (cold pull, plain download), the order flipped every pair so that neither
        #    side always runs second; each writes a new folder. The shared 2-core machine is
        #    noisy, so the ratio is the median of the per-pair ratios.
        pulls, downloads = [], []
        cpu = {"pull": [], "boto3": []}  # this process's CPU seconds (all threads): load-independent

        def timed_pull(i: int) -> float:
            shutil.rmtree(work / "cache", ignore_errors=True)  # cold: nothing cached
            os.sync()  # start clean: no writeback of the previous run's 400 MB during this one
            t0, c0 = time.perf_counter(), time.process_time()
            registry.pull(f"bench-lcm-lora:{manifest.version}", work / f"pull{i}")
            cpu["pull"].append(time.process_time() - c0)
            return time.perf_counter() - t0

        def timed_download(i: int) -> float:
            (work / f"dl{i}").mkdir()
            os.sync()
            t0, c0 = time.perf_counter(), time.process_time()
            boto3_download(storage, keys, work / f"dl{i}")
            cpu["boto3"].append(time.process_time() - c0)
            return time.perf_counter() - t0

        timed_pull(-1), timed_download(-1)  # warm-up pair, not counted
        for i in range(args.repeats):
            if i % 2 == 0:
                pulls.append(timed_pull(i))
                downloads.append(timed_download(i))
            else:
                downloads.append(timed_download(i))
                pulls.append(timed_pull(i))
            shutil.rmtree(work / f"pull{i}")
            shutil.rmtree(work / f"dl{i}")
            shutil.rmtree(work / "cache", ignore_errors=True)
        registry.pull(f"bench-lcm-lora:{manifest.version}", work / "warm0")  # fills the cache
        t0 = time.perf_counter()
        warm = registry.pull(f"bench-lcm-lora:{manifest.version}", work / "warm")
        warm_s = time.perf_counter() - t0

        pull_med, dl_med = statistics.median(pulls), statistics.median(downloads)
        print(f"load average (1 min) at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f}, "
              f"{os.cpu_count()} CPUs")
        print(f"version: {total_mb:.0f} MB in {len(manifest.files)} files at {endpoint} (publish {publish_s:.2f} s)")
        print(f"registry pull (cold cache, sha256-verified): median {pull_med:.2f} s "
              f"({total_mb / pull_med:.0f} MB/s)  runs {[round(x, 2) for x in pulls]}")
        print(f"boto3 download_file (no verification):       median {dl_med:.2f} s "
              f"({total_mb / dl_med:.0f} MB/s)  runs {[round(x, 2) for x in downloads]}")
        print(f"second pull (cache hit, re-verified, {len(warm.downloaded)} downloaded): {warm_s:.2f} s")
        print(f"client CPU seconds, median: pull {statistics.median(cpu['pull'][1:]):.2f}, "
              f"boto3 {statistics.median(cpu['boto3'][1:]):.2f}")
        ratios = [p / d for p, d in zip(pulls, downloads, strict=True)]
        print(f"ratio pull / boto3: median of pairs {statistics.median(ratios):.2f}, of medians "
              f"{pull_med / dl_med:.2f}, of minima {min(pulls) / min(downloads):.2f} (goal <= 1.2)")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
