"""Reference-server throughput on the toy base (CPU): requests/s and p50/p95 latency at 4 steps.

    OMP_NUM_THREADS=1 python bench/bench_serve.py [--requests 200] [--concurrency 8]

Publishes a random toy LoRA to a temporary local registry, serves it with components/serve/server.py
under uvicorn on 127.0.0.1 (adapter loaded, then fused: `lcmlora serve --fuse`) and drives it
with httpx. Prints the command and one line per mode for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import socket
import statistics
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


def make_lora(pipe, folder: Path) -> Path:
    """Copied from tests/test_serve.py (make_toy_lora): a random peft LoRA in contract-4 layout."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    import torch

    from components.models.base_model import load_base
    from components.registry.registry import Registry
    from components.serve.server import LoraSwapper, copying_factory, create_app
    from components.storage.storage import Storage

    print("command: OMP_NUM_THREADS=1 python bench/bench_serve.py " + " ".join(sys.argv[1:]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.requests} requests, "
          f"concurrency {args.concurrency}, toy base 32x32, 4 steps, guidance 1.0")
    base = load_base(str(REPO / "data" / "toy" / "base"))
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(Storage(f"{tmp}/registry"), cache_dir=f"{tmp}/cache")
        reg.publish(make_lora(base.pipe, Path(tmp) / "lora"), "bench-lora", alias="production")
        for fuse in (False, True):
            swapper = LoraSwapper(reg, "bench-lora@production", copying_factory(base.pipe, base.family), fuse=fuse)
            with running(create_app(swapper)) as url:
                r = measure(url, args.requests, args.concurrency)
            print(f"{'fused  ' if fuse else 'adapter'}: {r['rps']:.1f} requests/s, p50 {r['p50_ms']:.0f} ms, "
                  f"p95 {r['p95_ms']:.0f} ms")


if __name__ == "__main__":
    main()
