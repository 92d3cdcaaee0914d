"""components/serve/lora_slot.py and the in-place swap of components/serve/server.py: the real server (uvicorn +
httpx) on a local registry and the toy base. A request in flight finishes on the old weights, a compiled UNet is
not recompiled by a swap, a LoRA the slot cannot take is refused with what to do, and a hot-swap diffusers
refuses part-way puts the old version back. Also components/serve/rwlock.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from components.registry.registry import Registry
from components.serve.lora_slot import SlotMisfit
from components.serve.pipeline_loader import load_lcm_pipeline, pulled_lora
from components.serve.rwlock import ReadWriteLock
from components.serve.server import LoraSwapper, create_app
from components.storage.storage import Storage
from tests.test_serve import (
    PROMPT,
    fresh,
    generate,
    load_toy_base,
    make_toy_lora,
    pixels,
    running,
    wait_for,
)
from tests.tiny_pipeline import single_thread

_toy_base = pytest.fixture(scope="module", name="toy_base")(load_toy_base)
_one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
NAME = "toy-lcm-lora"


def publish(reg: Registry, toy_base, tmp_path: Path, version_seeds: dict[int, dict]) -> dict[str, object]:
    """Publish one toy LoRA per {seed: make_toy_lora kwargs} as versions 1, 2, ...; version 1 is `production`."""
    manifests = {}
    for i, (seed, kwargs) in enumerate(version_seeds.items(), start=1):
        folder = make_toy_lora(toy_base, tmp_path / f"v{i}", seed=seed, **kwargs)
        manifests[str(i)] = reg.publish(folder, NAME, alias="production" if i == 1 else None).manifest
    return manifests


def reference_pixels(reg: Registry, toy_base, version: str) -> np.ndarray:
    """The image the old way makes (version loaded into a fresh copy of the base), as served: 4 steps, seed 0."""
    import torch

    pipe = load_lcm_pipeline(f"{NAME}:{version}", fresh(toy_base)[0], reg)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(image, dtype=np.int16)


def as_array(resp: httpx.Response) -> np.ndarray:
    return np.frombuffer(pixels(resp), dtype=np.uint8).reshape(32, 32, 3).astype(np.int16)


def test_a_request_in_flight_finishes_on_the_old_weights_and_the_swap_is_in_place(tmp_path: Path, toy_base) -> None:
    reg = Registry(Storage(str(tmp_path / "registry")), cache_dir=tmp_path / "cache")
    publish(reg, toy_base, tmp_path, {1: {"rank": 4}, 2: {"rank": 8}})  # ranks differ: v1 is padded to the slot
    pipe, family = fresh(toy_base)
    swapper = LoraSwapper(reg, f"{NAME}@production", pipe, family, max_rank=8, poll_s=3600)  # swaps by check()
    with running(create_app(swapper)) as url, httpx.Client(base_url=url, timeout=120) as client:
        first = generate(client)
        assert np.abs(as_array(first) - reference_pixels(reg, toy_base, "1")).max() <= 1  # padding: float rounding

        # 1. Hold a request inside its first UNet call.
        inside, release = threading.Event(), threading.Event()

        def hold(module, args):
            if not inside.is_set():
                inside.set()
                assert release.wait(60)

        hook = pipe.unet.register_forward_pre_hook(hold)
        in_flight: dict[str, httpx.Response] = {}
        request = threading.Thread(target=lambda: in_flight.update(resp=generate(client)))
        request.start()
        assert inside.wait(60)
        hook.remove()

        # 2. The swap pulls and verifies v2 (milliseconds here), then waits for the request to finish.
        reg.alias_set(NAME, "production", "2")
        swap = threading.Thread(target=swapper.check)
        swap.start()
        swap.join(2.0)
        assert swap.is_alive() and client.get("/model").json()["version"] == "1"
        release.set()
        request.join(60)
        swap.join(60)
        resp = in_flight["resp"]
        assert resp.headers["x-lcmlora-version"] == "1" and pixels(resp) == pixels(first)  # all 4 steps on v1

        # 3. The same pipeline now serves v2, as the old way would.
        later = generate(client)
        assert later.headers["x-lcmlora-version"] == "2" and swapper.active.pipe is pipe
        assert np.abs(as_array(later) - reference_pixels(reg, toy_base, "2")).max() <= 1
        model = client.get("/model").json()
        assert (model["swap"], model["max_rank"], model["swaps"], model["failed"]) == ("in-place", 8, 2, None)


def test_a_compiled_unet_is_not_recompiled_by_a_hot_swap(tmp_path: Path, toy_base) -> None:
    """Dynamo's graph counter across a swap of a rank-4 for a rank-8 LoRA (a recompile adds a graph). The eager
    backend keeps this test to seconds; recompiles are decided by dynamo's guards, whatever the backend
    (`--compile` uses inductor, which also kept one graph across the swap when checked by hand)."""
    import torch
    from torch._dynamo.utils import counters

    reg = Registry(Storage(str(tmp_path / "registry")), cache_dir=tmp_path / "cache")
    publish(reg, toy_base, tmp_path, {1: {"rank": 4}, 2: {"rank": 8}})
    torch._dynamo.reset()
    swapper = LoraSwapper(reg, f"{NAME}@production", *fresh(toy_base), max_rank=8, compile_backend="eager",
                          poll_s=0.1)
    with running(create_app(swapper)) as url, httpx.Client(base_url=url, timeout=300) as client:
        generate(client)  # compiles the UNet
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1  # it was compiled
        reg.alias_set(NAME, "production", "2")
        wait_for(lambda: client.get("/model").json()["version"] == "2")
        later = generate(client)
        assert later.headers["x-lcmlora-version"] == "2" and counters["stats"]["unique_graphs"] == graphs
        assert client.get("/model").json()["compiled"] == "eager"
    assert np.abs(as_array(later) - reference_pixels(reg, toy_base, "2")).max() <= 1

    # The counter is not blind: the same swap without the slot (no enable_lora_hotswap) does recompile.
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    pipe = load_lcm_pipeline(f"{NAME}:1", fresh(toy_base)[0], reg)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.compile(backend="eager")
    pipe(PROMPT, num_inference_steps=1, guidance_scale=1.0)
    with pulled_lora(f"{NAME}:2", reg) as (_, weights):
        pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name="lcm", hotswap=True)
    pipe(PROMPT, num_inference_steps=1, guidance_scale=1.0)
    assert counters["stats"]["unique_graphs"] == graphs + 2


@pytest.mark.parametrize(("v2", "expected"), [
    ({"rank": 8}, ["rank 8 in 56 layers", "above the hot-swap slot's rank 4", "restart `lcmlora serve` with --max-rank 8"]),
    ({"targets": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")},
     ["7 layers outside the hot-swap slot", "ff.net.2", "the 56 layers of the version loaded at start"]),
], ids=["higher-rank", "other-layers"])
def test_a_lora_the_slot_cannot_take_is_refused_and_the_old_version_keeps_serving(
        v2: dict, expected: list[str], tmp_path: Path, toy_base) -> None:
    reg = Registry(Storage(str(tmp_path / "registry")), cache_dir=tmp_path / "cache")
    publish(reg, toy_base, tmp_path, {1: {"rank": 4}, 2: v2})
    swapper = LoraSwapper(reg, f"{NAME}@production", *fresh(toy_base), max_rank=4, poll_s=0.1)
    with running(create_app(swapper)) as url, httpx.Client(base_url=url, timeout=120) as client:
        before = generate(client)
        reg.alias_set(NAME, "production", "2")
        wait_for(lambda: client.get("/model").json()["failed"] is not None)
        model = client.get("/model").json()
        assert (model["version"], model["failed"]["version"], model["swap"]) == ("1", "2", "in-place")
        error = model["failed"]["error"]
        assert error.startswith(f"SlotMisfit: {NAME}:2 cannot be hot-swapped in place: ")
        for part in expected:
            assert part in error, (part, error)
        after = generate(client)
        assert after.headers["x-lcmlora-version"] == "1" and pixels(after) == pixels(before)


def test_a_first_version_above_the_slot_rank_stops_the_start_with_what_to_do(tmp_path: Path, toy_base) -> None:
    reg = Registry(Storage(str(tmp_path / "registry")), cache_dir=tmp_path / "cache")
    publish(reg, toy_base, tmp_path, {1: {"rank": 8}})
    swapper = LoraSwapper(reg, f"{NAME}@production", *fresh(toy_base), max_rank=4)
    with pytest.raises(SlotMisfit, match=r"rank 8 in 56 layers .* restart `lcmlora serve` with --max-rank 8"):
        swapper.start()
    assert swapper.active is None


def test_a_hot_swap_diffusers_refuses_part_way_restores_the_old_version(tmp_path: Path, toy_base) -> None:
    """v2's to_q layers have rank 2, the others 4: diffusers derives an alpha_pattern the slot's config lacks,
    refuses the hot-swap and deletes the adapter on the way out. The server loads v1 back."""
    reg = Registry(Storage(str(tmp_path / "registry")), cache_dir=tmp_path / "cache")
    publish(reg, toy_base, tmp_path, {1: {"rank": 4}, 2: {"rank": 4, "rank_pattern": {"to_q": 2}}})
    pipe, family = fresh(toy_base)
    swapper = LoraSwapper(reg, f"{NAME}@production", pipe, family, max_rank=4, poll_s=0.1)
    with running(create_app(swapper)) as url, httpx.Client(base_url=url, timeout=120) as client:
        before = generate(client)
        reg.alias_set(NAME, "production", "2")
        wait_for(lambda: client.get("/model").json()["failed"] is not None)
        model = client.get("/model").json()
        assert model["version"] == "1" and model["failed"]["version"] == "2"
        error = model["failed"]["error"]
        assert error.startswith(f"RuntimeError: diffusers refused to hot-swap {NAME}:2 (ValueError: Configs are")
        assert "alpha_pattern" in error and "version 1 was loaded back" in error and "restart `lcmlora serve`" in error
        assert "lcm" in pipe.unet.peft_config  # the adapter is back
        after = generate(client)
        assert after.headers["x-lcmlora-version"] == "1" and pixels(after) == pixels(before)
        assert client.get("/healthz").json() == {"status": "ok", "version": "1"}


def test_fused_weights_are_refused_in_place(toy_base) -> None:
    with pytest.raises(ValueError, match="swap='reload'"):
        LoraSwapper(None, f"{NAME}@production", *fresh(toy_base), fuse=True)


def test_a_waiting_writer_goes_before_readers_that_arrive_after_it() -> None:
    lock, order = ReadWriteLock(), []
    first_in, writer_waiting = threading.Event(), threading.Event()

    def reader(name: str, hold: threading.Event | None = None) -> None:
        with lock.reading():
            order.append(name)
            if hold is not None:
                first_in.set()
                assert hold.wait(10)

    def writer() -> None:
        writer_waiting.set()
        with lock.writing():
            order.append("writer")

    hold = threading.Event()
    threads = [threading.Thread(target=reader, args=("reader-1", hold))]
    threads[0].start()
    assert first_in.wait(10)
    threads.append(threading.Thread(target=writer))
    threads[1].start()
    assert writer_waiting.wait(10)
    time.sleep(0.2)  # the writer is now blocked on reader-1
    threads.append(threading.Thread(target=reader, args=("reader-2",)))
    threads[2].start()
    time.sleep(0.2)
    assert order == ["reader-1"]  # neither the writer nor the late reader got in
    hold.set()
    for t in threads:
        t.join(10)
    assert order == ["reader-1", "writer", "reader-2"]
