"""Reference server: serve 4-step images from a registry LoRA and hot-swap it when its alias moves.

`LoraSwapper` serves one pipeline and swaps its LoRA in one of two ways (`swap`, shown by
GET /model):
- "in-place" (the default): diffusers' hot-swap copies the new version's weights into the
  adapter already loaded (components/serve/lora_slot.py), so there is one pipeline and a
  compiled UNet (`compile_backend`) is not recompiled. A version the slot cannot take (higher
  rank than `max_rank`, other layers, text-encoder layers) is refused with what to do.
- "reload" (`fuse`, which bakes the LoRA into the base weights): each version goes into a deep
  copy of the pristine base, built beside the one serving.

Either way a new version is pulled and its digests verified before anything switches, and the
switch waits for the request running on the old weights and holds new ones back (a
readers-writer lock: a request reads, the switch writes), so no request sees a half-swapped
model. Generation itself is serialised (diffusers schedulers keep per-call state). A version
that fails to pull, verify or load keeps the old one serving and is reported by `status()`
(GET /model).

`create_app` is the FastAPI app: POST /generate -> PNG (headers name the version and digest
that made it), GET /healthz, GET /model. `lcmlora serve` (flows/serve_cli.py) runs it with
uvicorn.
"""

from __future__ import annotations

import copy
import io
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

# At module level: FastAPI resolves the endpoints' string annotations in this module's globals.
from fastapi.responses import Response
from pydantic import BaseModel, Field

from components.registry.manifest import parse_reference
from components.registry.registry import Registry
from components.serve import lora_slot
from components.serve.pipeline_loader import apply_lcm_lora, pulled_lora
from components.serve.rwlock import ReadWriteLock

POLL_S = 2.0  # how often the watcher reads the alias
RETRY_S = 60.0  # a version whose load failed is retried after this long (or when the alias moves)
MAX_STEPS = 50  # largest num_inference_steps a request may ask for
MAX_RANK = 64  # the in-place slot's rank: LCM-LoRA's published rank and distill.lora_rank's default

Swap = Literal["in-place", "reload"]


class GenerateRequest(BaseModel):
    """The body of POST /generate."""

    prompt: str = Field(min_length=1, max_length=1000)
    steps: int = Field(4, ge=1, le=MAX_STEPS)  # LCM-LoRA's recommended 4
    guidance: float = Field(1.0, ge=0.0, le=20.0)  # 1.0: no classifier-free guidance
    seed: int = Field(0, ge=0, le=2**63 - 1)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Served:
    """The pipeline serving and the version in it (replaced whole at every switch)."""

    pipe: Any
    version: str
    digest: str
    loaded_at: str


@dataclass(frozen=True)
class Failure:
    version: str
    error: str
    at: str
    monotonic: float


class LoraSwapper:
    """Serve `ref` (NAME@ALIAS, NAME:VERSION, NAME@sha256:...) on the base pipeline `pipe`.

    "in-place" serves `pipe` itself and changes its weights; "reload" keeps `pipe` pristine and
    serves deep copies. `compile_backend` torch.compiles the UNet ("inductor": `--compile`).
    """

    def __init__(self, registry: Registry, ref: str, pipe: Any, family: str | None = None, *,
                 swap: Swap = "in-place", fuse: bool = False, max_rank: int = MAX_RANK,
                 compile_backend: str | None = None, poll_s: float = POLL_S, retry_s: float = RETRY_S):
        if swap not in ("in-place", "reload"):
            raise ValueError(f"swap={swap!r}: use 'in-place' or 'reload'")
        if fuse and swap == "in-place":
            raise ValueError("fused LoRA weights cannot be hot-swapped in place: use swap='reload' with fuse")
        self.registry = registry
        self.ref = ref
        self.reference = parse_reference(ref)
        self.pipe = pipe
        self.family = family
        self.swap = swap
        self.fuse = fuse
        self.max_rank = max_rank
        self.compile_backend = compile_backend
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.active: Served | None = None
        self.failure: Failure | None = None
        self.swaps = 0
        pipe.set_progress_bar_config(disable=True)
        self._swap_lock = threading.Lock()  # one load at a time
        self._gate = ReadWriteLock()  # the running request reads; the switch writes
        self._run_lock = threading.Lock()  # one generation at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- loading and swapping ------------------------------------------------------------

    def _switch_reload(self, version: str) -> None:
        """Load `version` into a deep copy of the pristine base, then serve the copy."""
        pipe = copy.deepcopy(self.pipe)
        manifest = apply_lcm_lora(pipe, f"{self.reference.name}:{version}", self.registry, family=self.family,
                                  adapter_name=lora_slot.ADAPTER, fuse=self.fuse)
        if self.compile_backend is not None:
            pipe.unet.compile(backend=self.compile_backend)
        with self._gate.writing():
            self.active = Served(pipe, manifest.version, manifest.digest, _now())

    def _switch_in_place(self, version: str) -> None:
        """Hot-swap `version` into the slot of the served pipeline (open the slot on the first load)."""
        ref = f"{self.reference.name}:{version}"
        previous = self.active
        # 1. Pull and verify, and check the version fits the slot, while the old one serves.
        with pulled_lora(ref, self.registry, family=self.family) as (manifest, weights):
            slot = None if previous is None else lora_slot.slot_layers(self.pipe.unet)
            problems = lora_slot.misfits(lora_slot.lora_ranks(weights), slot, self.max_rank)
            if problems:
                raise lora_slot.SlotMisfit(f"{ref} cannot be hot-swapped in place: " + "; ".join(problems))
            # 2. The switch: the running request finishes on the old weights, later ones wait.
            with self._gate.writing():
                if previous is None:
                    lora_slot.open_slot(self.pipe, weights, max_rank=self.max_rank,
                                        compile_backend=self.compile_backend)
                else:
                    try:
                        lora_slot.swap(self.pipe, weights)
                    except Exception as exc:
                        self._restore(previous, exc)
                        raise RuntimeError(f"diffusers refused to hot-swap {ref} ({type(exc).__name__}: {exc}); "
                                           f"version {previous.version} was loaded back and serves; restart "
                                           "`lcmlora serve` to serve this version") from exc
                self.active = Served(self.pipe, manifest.version, manifest.digest, _now())

    def _restore(self, previous: Served, exc: Exception) -> None:
        """After a failed hot-swap, the previous version back into the slot (else serve nothing)."""
        try:
            with pulled_lora(f"{self.reference.name}:{previous.version}", self.registry,
                             family=self.family) as (_, weights):
                lora_slot.restore(self.pipe, weights, max_rank=self.max_rank)
        except Exception as restore_exc:  # noqa: BLE001 - any failure leaves the weights unknown
            self.active = None  # the weights are neither version: /healthz and /generate answer 503
            raise RuntimeError(f"hot-swap failed ({type(exc).__name__}: {exc}) and restoring version "
                               f"{previous.version} failed too ({type(restore_exc).__name__}: {restore_exc}); "
                               "restart `lcmlora serve`") from exc

    def check(self) -> bool:
        """Resolve the reference; if it points elsewhere, load that version and switch. True if swapped.

        A failed load is recorded (not raised) and the current version keeps serving; the same
        version is tried again after `retry_s`. Only the first load raises.
        """
        with self._swap_lock:
            _, version = self.registry.resolve(self.reference)
            if self.active is not None and self.active.version == version:
                self.failure = None if self.failure and self.failure.version == version else self.failure
                return False
            failed = self.failure
            if failed is not None and failed.version == version and time.monotonic() - failed.monotonic < self.retry_s:
                return False
            first = self.active is None and self.swaps == 0
            try:
                if self.swap == "in-place":
                    self._switch_in_place(version)
                else:
                    self._switch_reload(version)
            except Exception as exc:
                self.failure = Failure(version, f"{type(exc).__name__}: {exc}", _now(), time.monotonic())
                if first:
                    raise
                return False
            self.failure = None
            self.swaps += 1
            return True

    def start(self) -> None:
        """Load the current version (raises if it cannot), then watch the alias in a thread."""
        self.check()
        if self.reference.alias is None:
            return  # pinned by version or digest: nothing moves
        self._thread = threading.Thread(target=self._watch, name="lcmlora-lora-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - an unreachable registry must not stop the watcher
                self.failure = Failure("?", f"{type(exc).__name__}: {exc}", _now(), time.monotonic())

    # --- serving ---------------------------------------------------------------------------

    def generate(self, prompt: str, *, steps: int = 4, guidance: float = 1.0, seed: int = 0,
                 ) -> tuple[bytes, Served]:
        """A PNG from the version serving now, and which version made it."""
        import torch

        # The run lock first: requests queued behind the running one are not yet in flight,
        # so a switch waits for one request at most and the queue then meets the new version.
        with self._run_lock, self._gate.reading():
            served = self.active
            if served is None:
                raise RuntimeError("no version loaded yet")
            image = served.pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                                generator=torch.Generator().manual_seed(seed)).images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), served

    def status(self) -> dict[str, Any]:
        """What GET /model reports: the version served, how swaps happen and the last failed load, if any."""
        served = self.active
        failure = self.failure
        return {
            "ref": self.ref, "name": self.reference.name,
            "version": served.version if served else None, "digest": served.digest if served else None,
            "loaded_at": served.loaded_at if served else None, "fused": self.fuse, "swaps": self.swaps,
            "swap": self.swap, "max_rank": self.max_rank if self.swap == "in-place" else None,
            "compiled": self.compile_backend,
            "failed": None if failure is None else {"version": failure.version, "error": failure.error,
                                                    "at": failure.at},
        }


def create_app(swapper: LoraSwapper) -> Any:
    """The FastAPI app over `swapper` (started and stopped with the app's lifespan)."""
    import contextlib

    from fastapi import FastAPI, HTTPException
    from fastapi.concurrency import run_in_threadpool

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if swapper.active is None:
            await run_in_threadpool(swapper.start)
        try:
            yield
        finally:
            swapper.stop()

    app = FastAPI(title="lcmlora reference server", lifespan=lifespan)

    @app.post("/generate", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def generate(req: GenerateRequest) -> Response:
        try:
            png, served = swapper.generate(req.prompt, steps=req.steps, guidance=req.guidance, seed=req.seed)
        except RuntimeError as exc:
            raise HTTPException(status_code=503, detail=str(exc)) from None
        return Response(png, media_type="image/png",
                        headers={"X-Lcmlora-Version": served.version, "X-Lcmlora-Digest": served.digest})

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        served = swapper.active
        if served is None:
            raise HTTPException(status_code=503, detail="no version loaded")
        return {"status": "ok", "version": served.version}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return swapper.status()

    return app
