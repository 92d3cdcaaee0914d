"""components/serve/server.py: the reference server, started with uvicorn on 127.0.0.1 and driven by a real
HTTP client (httpx), on a local and a SeaweedFS registry, generating from the toy base. The hot-swap slot's
own rules (compile, refusals, restore) are in tests/test_serve_hotswap.py."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from components.registry.registry import Registry
from components.serve.server import LoraSwapper, create_app
from components.storage.storage import Storage

BACKENDS = pytest.mark.parametrize("root", ["local", "s3"], indirect=True)
CARD = ("---\nbase_model: data/toy/base\nlibrary_name: diffusers\ntags: [lora, lcm]\n"
        "recommended:\n  num_inference_steps: 4\n  guidance_scale: 1.0\n---\n\n# toy lora\n")
PROMPT = "a handwritten digit seven"
TOY_BASE = Path(__file__).resolve().parents[1] / "data" / "toy" / "base"
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
SWAPS = pytest.mark.parametrize("swap", ["in-place", "reload"])


@pytest.fixture
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/registry"
    return str(tmp_path / "registry")


def load_toy_base():
    """The toy base pipeline and its family (a module fixture here and in tests/test_serve_hotswap.py): loaded once,
    every server gets a deep copy (`fresh`), since serving in place changes the pipeline."""
    from components.models.base_model import load_base

    loaded = load_base(str(TOY_BASE))
    loaded.pipe.set_progress_bar_config(disable=True)
    return loaded.pipe, loaded.family


toy_base = pytest.fixture(scope="module", name="toy_base")(load_toy_base)


def fresh(toy_base) -> tuple:
    """(a deep copy of the toy base pipeline, its family): LoraSwapper's `pipe, family`."""
    return copy.deepcopy(toy_base[0]), toy_base[1]


def make_toy_lora(toy_base, folder: Path, seed: int, *, rank: int = 4, targets: tuple[str, ...] = ATTENTION,
                  rank_pattern: dict[str, int] | None = None) -> Path:
    """A random (peft-initialised, B != 0) LoRA for the toy UNet in contract-4 layout, gate passed."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(toy_base[0].unet)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), rank_pattern=rank_pattern or {},
                                init_lora_weights=False))
    for p in unet.parameters():  # small enough to keep the images finite, large enough to change them
        if p.requires_grad:
            p.data.mul_(0.5)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    (folder / "README.md").write_text(CARD)
    (folder / "lineage.json").write_text(json.dumps({"base": {"reference": "data/toy/base", "family": "sd15"}}))
    (folder / "metrics.json").write_text(json.dumps({"seed": seed, "gate": {"passed": True, "violations": []}}))
    return folder


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """uvicorn serving `app` on a free 127.0.0.1 port in a thread; stopped also on failure."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def generate(client: httpx.Client, seed: int = 0) -> httpx.Response:
    resp = client.post("/generate", json={"prompt": PROMPT, "seed": seed})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png" and resp.content.startswith(b"\x89PNG")
    return resp


def pixels(resp: httpx.Response) -> bytes:
    from PIL import Image

    image = Image.open(io.BytesIO(resp.content))
    assert image.size == (32, 32)
    return image.tobytes()


@BACKENDS
@SWAPS
def test_alias_move_swaps_the_lora_under_fifty_concurrent_requests(root: str, swap: str, tmp_path: Path,
                                                                   toy_base) -> None:
    reg = Registry(Storage(root), cache_dir=tmp_path / "cache")
    v1 = reg.publish(make_toy_lora(toy_base, tmp_path / "v1", seed=1), "toy-lcm-lora", alias="production").manifest
    v2 = reg.publish(make_toy_lora(toy_base, tmp_path / "v2", seed=2), "toy-lcm-lora").manifest
    swapper = LoraSwapper(reg, "toy-lcm-lora@production", *fresh(toy_base), swap=swap, poll_s=0.1)
    with running(create_app(swapper)) as url, httpx.Client(base_url=url, timeout=120) as client:
        assert client.get("/healthz").json() == {"status": "ok", "version": "1"}
        model = client.get("/model").json()
        assert (model["version"], model["digest"], model["failed"], model["swap"]) == ("1", v1.digest, None, swap)
        first = generate(client)
        assert (first.headers["x-lcmlora-version"], first.headers["x-lcmlora-digest"]) == ("1", v1.digest)
        assert pixels(generate(client)) == pixels(first)  # same seed, same version: same image

        # 50 requests in flight while the alias moves: every one completes, on one version or the other.
        with ThreadPoolExecutor(50) as pool:
            futures = [pool.submit(generate, client, 0) for _ in range(50)]
            reg.alias_set("toy-lcm-lora", "production", "2")
            responses = [f.result() for f in futures]
        served = {r.headers["x-lcmlora-version"] for r in responses}
        assert len(responses) == 50 and served <= {"1", "2"}
        for r in responses:  # a response is wholly one version's image (never half-loaded)
            assert pixels(r) == pixels(first) or r.headers["x-lcmlora-version"] == "2"
        wait_for(lambda: client.get("/model").json()["version"] == "2")
        later = generate(client)
        assert (later.headers["x-lcmlora-version"], later.headers["x-lcmlora-digest"]) == ("2", v2.digest)
        assert pixels(later) != pixels(first)
        assert client.get("/model").json()["swaps"] == 2  # the first load and this one


@BACKENDS
def test_tampered_new_version_is_refused_while_the_old_keeps_serving(root: str, tmp_path: Path, toy_base) -> None:
    reg = Registry(Storage(root), cache_dir=tmp_path / "cache")
    reg.publish(make_toy_lora(toy_base, tmp_path / "v1", seed=1), "toy-lcm-lora", alias="production")
    reg.publish(make_toy_lora(toy_base, tmp_path / "v2", seed=2), "toy-lcm-lora")
    key = "toy-lcm-lora/versions/2/pytorch_lora_weights.safetensors"
    data = bytearray(reg.storage.read_bytes(key))
    data[-3] ^= 0xFF
    reg.storage.write_bytes(key, bytes(data))  # the stored weights no longer match the manifest
    swapper = LoraSwapper(reg, "toy-lcm-lora@production", *fresh(toy_base), poll_s=0.1)
    with running(create_app(swapper)) as url, httpx.Client(base_url=url, timeout=120) as client:
        before = generate(client)
        reg.alias_set("toy-lcm-lora", "production", "2")
        wait_for(lambda: client.get("/model").json()["failed"] is not None)
        model = client.get("/model").json()
        assert model["version"] == "1" and model["failed"]["version"] == "2"
        assert "VerificationError" in model["failed"]["error"] and "pytorch_lora_weights" in model["failed"]["error"]
        after = generate(client)
        assert after.headers["x-lcmlora-version"] == "1" and pixels(after) == pixels(before)
        assert client.get("/healthz").status_code == 200


def test_digest_reference_pins_a_version_and_bad_requests_are_refused(tmp_path: Path, toy_base) -> None:
    reg = Registry(Storage(str(tmp_path / "registry")), cache_dir=tmp_path / "cache")
    v1 = reg.publish(make_toy_lora(toy_base, tmp_path / "v1", seed=1), "toy-lcm-lora", alias="production").manifest
    reg.publish(make_toy_lora(toy_base, tmp_path / "v2", seed=2), "toy-lcm-lora")
    pinned = f"toy-lcm-lora@{v1.digest[:7 + 12]}"  # sha256: + 12 hex digits
    swapper = LoraSwapper(reg, pinned, *fresh(toy_base), poll_s=0.1)
    with running(create_app(swapper)) as url, httpx.Client(base_url=url, timeout=120) as client:
        assert generate(client).headers["x-lcmlora-digest"] == v1.digest
        assert client.post("/generate", json={"prompt": PROMPT, "steps": 0}).status_code == 422
        assert client.post("/generate", json={"seed": 1}).status_code == 422
        assert client.get("/model").json()["ref"] == pinned


def request_from_schema(spec: dict, schema: dict) -> dict:
    """A JSON body built only from an OpenAPI object schema: each field's default, a prompt for a required string."""
    if "$ref" in schema:  # "#/components/schemas/NAME"
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    assert schema["type"] == "object", schema
    body = {}
    for key, prop in schema["properties"].items():
        if "default" in prop:
            body[key] = prop["default"]
        else:
            assert key in schema.get("required", []) and prop["type"] == "string", (key, prop)
            assert prop.get("minLength", 0) <= len(PROMPT) <= prop.get("maxLength", len(PROMPT)), prop
            body[key] = PROMPT
    return body


def test_openapi_schema_is_served_and_drives_generate(tmp_path: Path, toy_base) -> None:
    reg = Registry(Storage(str(tmp_path / "registry")), cache_dir=tmp_path / "cache")
    v1 = reg.publish(make_toy_lora(toy_base, tmp_path / "v1", seed=1), "toy-lcm-lora", alias="production").manifest
    swapper = LoraSwapper(reg, "toy-lcm-lora@production", *fresh(toy_base), poll_s=0.1)
    with running(create_app(swapper)) as url, httpx.Client(base_url=url, timeout=120) as client:
        resp = client.get("/openapi.json")
        assert resp.status_code == 200, resp.text
        spec = resp.json()
        docs = client.get("/docs")
        assert docs.status_code == 200 and "/openapi.json" in docs.text

        # The operation that answers a PNG, found from the schema alone (path, method, body).
        [(path, operation)] = [(p, op) for p, ops in spec["paths"].items() for method, op in ops.items()
                               if method == "post" and "image/png" in op["responses"]["200"].get("content", {})]
        body_schema = operation["requestBody"]["content"]["application/json"]["schema"]
        body = request_from_schema(spec, body_schema)
        made = client.post(path, json=body)
        assert made.status_code == 200, made.text
        assert made.headers["content-type"] == "image/png" and made.content.startswith(b"\x89PNG")
        assert (made.headers["x-lcmlora-version"], made.headers["x-lcmlora-digest"]) == ("1", v1.digest)
        assert pixels(made) == pixels(generate(client, seed=body["seed"]))  # the advertised defaults are the served ones

        # The bounds the schema advertises are the ones the server enforces.
        fields = spec["components"]["schemas"][body_schema["$ref"].rsplit("/", 1)[1]]["properties"]
        too_many = {**body, "steps": fields["steps"]["maximum"] + 1}
        assert client.post(path, json=too_many).status_code == 422
