"""Two bases with the same VAE encoding at the same time: one claims the shard folder, the other reuses it.

The encode runner takes a create-only claim in storage (components/stages/encode.py); the run
that loses waits for the winner's index and writes no shard of its own.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter

import torch

from components.config import EncodeConfig, parse_params
from components.data.shards import index_path
from components.models.base_model import fingerprint_base
from components.stages.encode import CLAIM, claim_folder, run_encode
from components.storage.storage import Storage
from tests.test_encode import RES, tiny_vae, world  # noqa: F401 - the module fixture


def test_concurrent_bases_with_one_vae_encode_once(world, tmp_path, monkeypatch):  # noqa: F811
    root = tmp_path / "root"
    shutil.copytree(world["storage"].url("curated"), root / "curated")
    world["vae"].save_pretrained(tmp_path / "base" / "vae")
    bases = parse_params({"bases": {n: {"reference": str(tmp_path / "base"), "family": "sd15", "resolution": RES}
                                    for n in ("toy", "toy-ft")}}).bases
    writes: Counter[str] = Counter()
    lock = threading.Lock()
    original = Storage.write_bytes

    def counting(self, rel, data, *, create_only=False):
        if rel.endswith(".tar"):
            with lock:
                writes[rel] += 1
            time.sleep(0.2)  # slow shards: the two runs overlap for sure
        return original(self, rel, data, create_only=create_only)

    monkeypatch.setattr(Storage, "write_bytes", counting)
    outs, errors = {}, []

    def encode(name: str) -> None:
        try:
            outs[name] = run_encode(EncodeConfig(workers=1, batch_size=8, shard_size=8),
                                    base=fingerprint_base(name, bases[name], vae_only=True),
                                    storage=Storage(str(root)),
                                    manifest_rel="curated/manifest.parquet", source=world["source"],
                                    claim_owner=f"run-{name}", claim_stale_s=60)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=encode, args=(n,)) for n in bases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    # the two VAE loads ran in two threads: nothing after them is built on the meta device
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
    a, b = outs["toy"], outs["toy-ft"]
    assert a.index == b.index and a.index_hash == b.index_hash
    assert sorted([a.reused, b.reused]) == [False, True], "exactly one of them encoded"
    winner = a if not a.reused else b
    assert winner.shards > 1 and winner.encoded_shards >= winner.shards  # planned shards (some all-rejected)
    assert len(writes) == winner.encoded_shards and set(writes.values()) == {1}, f"a shard written twice: {writes}"
    assert not (root / a.index).parent.joinpath(CLAIM).exists(), "the claim is released once the index exists"


def test_claim_waits_for_the_holder_and_takes_over_a_stale_one(tmp_path) -> None:
    storage, folder = Storage(str(tmp_path)), "latents/vae/32px-m"
    # 1. A live claim of another owner: wait until its index appears, then reuse (False).
    storage.write_text(f"{folder}/{CLAIM}", json.dumps({"owner": "other", "at": time.time()}))
    threading.Timer(0.5, lambda: storage.write_text(index_path(folder), "{}")).start()
    t0 = time.monotonic()
    assert claim_folder(storage, folder, "me", poll_s=0.05) is False
    assert time.monotonic() - t0 >= 0.4
    # 2. A stale claim (its process died): taken over.
    other = "latents/vae/32px-n"
    storage.write_text(f"{other}/{CLAIM}", json.dumps({"owner": "dead", "at": time.time() - 3600}))
    assert claim_folder(storage, other, "me", stale_s=600, poll_s=0.05) is True
    assert json.loads(storage.read_text(f"{other}/{CLAIM}"))["owner"] == "me"
    # 3. Our own claim (a retried run): resumed at once; a second owner is refused meanwhile.
    assert claim_folder(storage, other, "me", poll_s=0.05) is True
    waiter = threading.Thread(target=claim_folder, args=(storage, other, "third"), kwargs={"poll_s": 0.05})
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), "a live foreign claim makes the caller wait"
    storage.write_text(index_path(other), "{}")
    waiter.join(timeout=5)
    assert not waiter.is_alive()
