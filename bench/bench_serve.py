"""Reference server on the toy base (CPU): throughput at 4 steps, and LoRA swap time and memory both ways.

    OMP_NUM_THREADS=1 python bench/bench_serve.py [--requests 200] [--concurrency 8] [--swaps 20]

Throughput (`--requests`, 0 skips it): publishes a random toy LoRA to a temporary local registry,
serves it with components/serve/server.py under uvicorn on 127.0.0.1 (adapter loaded into a fresh
pipeline, then fused: `lcmlora serve --fuse`) and drives it with httpx.

Swaps (`--swaps`, 0 skips them): two LoRA versions (ranks 4 and 8), the alias moved between them
`--swaps` times, each way in its own fresh process: "reload" (a deep copy of the pristine base per
version, the pre-hot-swap server) and "in-place" (diffusers' hot-swap into one pipeline, slot rank
`--max-rank`). Swap time is `LoraSwapper.check()` (pull from the warm cache, verify, load, switch).
Memory is the process's peak RSS (`ru_maxrss`: all CPU memory, torch tensors included) above its
RSS once the first version is loaded, and the RSS left after the swaps; then the latency of a 4-step
request after the last swap (the in-place slot computes at the padded rank). Prints the command and
one line per measurement for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CARD = ("---\nbase_model: data/toy/base\nlibrary_name: diffusers\ntags: [lora, lcm]\n"
        "recommended:\n  num_inference_steps: 4\n  guidance_scale: 1.0\n---\n\n# bench lora\n")


def make_lora(pipe, folder: Path, seed: int = 1, rank: int = 4) -> Path:
    """Copied from tests/test_serve.py (make_toy_lora): a random peft LoRA in contract-4 layout."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    for p in unet.parameters():
        if p.requires_grad:
            p.data.mul_(0.5)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    (folder / "README.md").write_text(CARD)
    (folder / "lineage.json").write_text(json.dumps({"base": {"reference": "data/toy/base", "family": "sd15"}}))
    (folder / "metrics.json").write_text(json.dumps({"gate": {"passed": True, "violations": []}}))
    return folder


@contextlib.contextmanager
def running(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def measure(url: str, requests: int, concurrency: int) -> dict[str, float]:
    import httpx

    def one(i: int) -> float:
        t0 = time.perf_counter()
        resp = client.post("/generate", json={"prompt": "a handwritten digit seven", "seed": i})
        resp.raise_for_status()
        return time.perf_counter() - t0

    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(3):
            one(i)  # warm-up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = sorted(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
    return {"rps": requests / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))]}


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_swaps(registry_root: str, cache_dir: str, swap: str, swaps: int, max_rank: int) -> dict[str, float]:
    """In this (fresh) process: serve version 1 `swap`'s way, move the alias 1 <-> 2 `swaps` times."""
    import torch

    from components.models.base_model import load_base
    from components.registry.registry import Registry
    from components.serve.server import LoraSwapper
    from components.storage.storage import Storage

    torch.set_num_threads(1)
    reg = Registry(Storage(registry_root), cache_dir=cache_dir)
    reg.alias_set("bench-lora", "production", "1")
    base = load_base(str(REPO / "data" / "toy" / "base"))
    # 1. The first load, and the baseline memory after it (the pipeline(s) a server holds at rest).
    swapper = LoraSwapper(reg, "bench-lora@production", base.pipe, base.family, swap=swap, max_rank=max_rank,
                          poll_s=3600)
    swapper.check()
    swapper.generate("warm-up", steps=1)
    rss0, peak0 = rss_mib(), peak_rss_mib()
    # 2. The swaps, each timed alone (the watcher thread is not started; check() is what it calls).
    times = []
    for i in range(swaps):
        reg.alias_set("bench-lora", "production", "2" if i % 2 == 0 else "1")
        t0 = time.perf_counter()
        assert swapper.check(), swapper.status()["failed"]
        times.append(time.perf_counter() - t0)
    rss1, peak1 = rss_mib(), peak_rss_mib()
    # 3. Requests after the last swap.
    latencies = []
    for seed in range(5):
        t0 = time.perf_counter()
        swapper.generate("a handwritten digit seven", steps=4, seed=seed)
        latencies.append(time.perf_counter() - t0)
    times.sort()
    return {"swap_p50_ms": 1000 * statistics.median(times), "swap_max_ms": 1000 * times[-1],
            "peak_over_rest_mib": peak1 - max(peak0, rss0), "rss_growth_mib": rss1 - rss0, "rest_rss_mib": rss0,
            "request_p50_ms": 1000 * statistics.median(latencies)}


def compare_swaps(base, swaps: int, max_rank: int) -> None:
    """Both ways side by side, each measured in a fresh process so neither inherits the other's peak."""
    from components.registry.registry import Registry
    from components.storage.storage import Storage

    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(Storage(f"{tmp}/registry"), cache_dir=f"{tmp}/cache")
        reg.publish(make_lora(base.pipe, Path(tmp) / "v1", seed=1, rank=4), "bench-lora", alias="production")
        reg.publish(make_lora(base.pipe, Path(tmp) / "v2", seed=2, rank=8), "bench-lora")
        results = {}
        for swap in ("reload", "in-place"):
            done = subprocess.run([sys.executable, __file__, "--measure-swaps", swap, "--swaps", str(swaps),
                                   "--max-rank", str(max_rank), "--registry", f"{tmp}/registry",
                                   "--cache", f"{tmp}/cache"],
                                  capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            results[swap] = json.loads(done.stdout.strip().splitlines()[-1])
    weights = sum(t.numel() * t.element_size() for c in base.pipe.components.values()
                  if hasattr(c, "state_dict") for t in c.state_dict().values()) / 2**20
    print(f"swaps: {swaps} alias moves between a rank-4 and a rank-8 LoRA; in-place slot rank {max_rank}; "
          f"one toy pipeline's weights {weights:.0f} MiB (reload holds 2 at rest, 3 during a swap; in-place 1)")
    for swap, r in results.items():
        print(f"{swap:8}: swap p50 {r['swap_p50_ms']:.0f} ms (max {r['swap_max_ms']:.0f} ms), peak RSS "
              f"+{r['peak_over_rest_mib']:.0f} MiB over rest ({r['rest_rss_mib']:.0f} MiB), RSS after swaps "
              f"{r['rss_growth_mib']:+.0f} MiB, request after swap p50 {r['request_p50_ms']:.0f} ms")
    old, new = results["reload"], results["in-place"]
    print(f"ratios reload/in-place: swap time {old['swap_p50_ms'] / new['swap_p50_ms']:.1f}x, peak RSS over rest "
          f"{old['peak_over_rest_mib'] / max(new['peak_over_rest_mib'], 1):.1f}x (MiB, floor 1), request "
          f"{old['request_p50_ms'] / new['request_p50_ms']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="throughput requests per mode (0: skip)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--swaps", type=int, default=20, help="alias moves per swap way (0: skip)")
    ap.add_argument("--max-rank", type=int, default=64, help="the in-place slot's rank (lcmlora serve --max-rank)")
    ap.add_argument("--measure-swaps", choices=["reload", "in-place"], help=argparse.SUPPRESS)  # child process
    ap.add_argument("--registry", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_swaps:
        print(json.dumps(measure_swaps(args.registry, args.cache, args.measure_swaps, args.swaps, args.max_rank)))
        return
    import torch

    from components.models.base_model import load_base
    from components.registry.registry import Registry
    from components.serve.server import LoraSwapper, create_app
    from components.storage.storage import Storage

    torch.set_num_threads(1)
    print("command: OMP_NUM_THREADS=1 python bench/bench_serve.py " + " ".join(sys.argv[1:]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.requests} requests, "
          f"concurrency {args.concurrency}, toy base 32x32, 4 steps, guidance 1.0")
    base = load_base(str(REPO / "data" / "toy" / "base"))
    if args.requests:
        with tempfile.TemporaryDirectory() as tmp:
            reg = Registry(Storage(f"{tmp}/registry"), cache_dir=f"{tmp}/cache")
            reg.publish(make_lora(base.pipe, Path(tmp) / "lora"), "bench-lora", alias="production")
            for fuse in (False, True):
                swapper = LoraSwapper(reg, "bench-lora@production", base.pipe, base.family, swap="reload", fuse=fuse)
                with running(create_app(swapper)) as url:
                    r = measure(url, args.requests, args.concurrency)
                print(f"{'fused  ' if fuse else 'adapter'}: {r['rps']:.1f} requests/s, p50 {r['p50_ms']:.0f} ms, "
                      f"p95 {r['p95_ms']:.0f} ms")
    if args.swaps:
        compare_swaps(base, args.swaps, args.max_rank)


if __name__ == "__main__":
    main()
