"""Multi-node distillation: `torchrun --nnodes 2` (two "nodes" on localhost, gloo, CPU).

The same file is the worker (`__main__`): under torchrun each rank (1) counts the samples its
share of one epoch of the latent shards holds (`latent_loader`, split by the process group's
rank), and (2) trains the tiny SD-1.5-family LCD-LoRA for a few steps from the same shards
(resampled, as `run_distill` does: rank r of N keeps its `GLOBAL // N` rows of each global
batch); rank 0 saves the LoRA.

- 2 nodes x 1 process (batch 4 each) give the same LoRA (1e-6) as ONE process of batch 8, same
  seed: every rank draws the global batch's samples, timesteps, noise and guidance from the
  same generators and keeps its rows (components/data/latent_loader.py, lcd.draw_lcd_sample), and
  DDP's averaged gradient of the per-rank mean losses is the global mean loss's gradient.
- 2 nodes x 1 process give the same LoRA (1e-6) and loss history as 1 node x 2 processes: the
  node boundary changes nothing.
- The per-rank split of an epoch loses and doubles no sample: counted over the two nodes.

Equality with one process holds at a fixed `num_workers` (the resampled stream is one per
DataLoader worker); here 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS, GLOBAL_BATCH = 3, 8  # per-rank batch: GLOBAL_BATCH // world size
# AdamW with adam_eps 1.0 (>> |g|, the gradient norm stays < 1): the update is linear in the gradient,
# so the float rounding by which 2 x 4 and 1 x 8 gradients differ (~1e-5, summed in another order)
# stays ~1e-7 in the LoRA; with eps 1e-8, g / sqrt(v) turns it into up to 2 lr on near-zero entries.
OPTIONS = {"max_steps": STEPS, "lr": 1e-2, "adam_eps": 1.0, "checkpoint_every": 0, "seed": 0}


def worker(root: str, index_rel: str, out: Path) -> None:
    """One rank: count its epoch share, train, save (rank 0)."""
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from components.data.latent_loader import make_loader
    from components.distill.lcd import schedule_from_scheduler_config
    from components.distill.trainer import TrainOptions, train_lcd_lora
    from components.lora.adapter import add_lora, lora_config
    from components.models.conditioning import TextConditioner
    from components.storage.storage import Storage
    from tests.test_trainer import SETTINGS_SD15, TARGETS
    from tests.tiny_models import tiny_pipeline

    storage = Storage(root)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    batch = GLOBAL_BATCH // world_size
    pipe = tiny_pipeline("sd15", out / f"pipe{rank}")
    torch.manual_seed(0)
    add_lora(pipe.unet, lora_config(4, 8, TARGETS))

    def batches(r: int, world: int):
        return make_loader(storage, index_rel, batch, shuffle=True, resample=True, seed=0, rank=r, world_size=world,
                           drop_last=True)

    result = train_lcd_lora(pipe.unet, TextConditioner.from_pipeline(pipe, "sd15"), batches, SETTINGS_SD15,
                            schedule_from_scheduler_config(dict(pipe.scheduler.config)),
                            TrainOptions(**OPTIONS), out / "run")
    # The epoch split, with the rank and world size the process group gives (the loader's defaults).
    keys = [k for b in make_loader(storage, index_rel, batch, shuffle=True, seed=7) for k in b["keys"]]
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": dist.get_rank(), "world_size": dist.get_world_size(), "node": os.environ.get("GROUP_RANK"),
        "keys": keys, "history": result.history}))
    if result.is_main_process:
        save_file({k: v.contiguous() for k, v in result.lora_state_dict.items()}, str(out / "lora.safetensors"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nnodes: int, nproc: int, root: str, index_rel: str, out: Path) -> None:
    """`torchrun` once per node (static rendezvous on 127.0.0.1), all at once; fails with their logs."""
    port, env = _port(), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(Path(__file__).resolve()), root, index_rel, str(out)]
        log = open(out / f"node{node}.log", "wb")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for p, _ in procs:
            p.wait(timeout=300)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    for node, (p, _) in enumerate(procs):
        assert p.returncode == 0, (out / f"node{node}.log").read_text()[-3000:]


@pytest.mark.slow
def test_two_nodes_match_one_process_and_split_every_sample_once(encoded, tmp_path) -> None:
    from safetensors.torch import load_file

    storage, index_rel, keys = encoded
    root = storage.url()
    _torchrun(2, 1, root, index_rel, tmp_path / "nodes2")
    _torchrun(1, 2, root, index_rel, tmp_path / "nodes1")
    _torchrun(1, 1, root, index_rel, tmp_path / "single")

    ranks = [json.loads((tmp_path / "nodes2" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"], r["node"]) for r in ranks] == [(0, 2, "0"), (1, 2, "1")]
    # The epoch split: disjoint and complete, counted.
    counts = [len(r["keys"]) for r in ranks]
    assert sum(counts) == len(keys) and all(counts), counts
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    assert sorted(ranks[0]["keys"] + ranks[1]["keys"]) == sorted(keys)
    # The LoRA: 2 nodes x batch 4 == 1 node x 2 processes == 1 process x batch 8 (and trained: B moved off zero).
    two = load_file(tmp_path / "nodes2" / "lora.safetensors")
    assert any(v.abs().sum() > 0 for k, v in two.items() if "lora_B" in k)
    for other in ("nodes1", "single"):
        lora = load_file(tmp_path / other / "lora.safetensors")
        assert two.keys() == lora.keys() and two
        diff = max((two[k] - lora[k]).abs().max().item() for k in two)
        assert diff <= 1e-6, (other, diff)
    assert ranks[0]["history"] == json.loads((tmp_path / "nodes1" / "rank0.json").read_text())["history"]
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert single["world_size"] == 1 and len(single["keys"]) == len(keys)  # one process: the whole epoch
    assert [s for s, _ in single["history"]] == [s for s, _ in ranks[0]["history"]] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(single["history"], ranks[0]["history"], strict=True):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(a))  # the mean over 8 samples == the mean of the 2 ranks' means


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
else:
    from tests.test_latent_loader import encoded  # noqa: F401 - the module fixture: shards of 40 samples
