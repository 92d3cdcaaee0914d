"""Reference server: serve 4-step images from a registry LoRA and hot-swap it when its alias moves.

`LoraSwapper` holds the pipeline being served and swaps it whole: a new version is pulled
(verified), loaded into a second, freshly built pipeline and only then switched in by one
reference assignment, so a request never sees a half-loaded model. A request takes the
current pipeline when it starts and keeps it to the end, so requests in flight during a swap
complete on the old version. Generation on one pipeline is serialised by its lock (diffusers
schedulers keep per-call state). A failed or tampered pull keeps the old version serving and
is reported by `status()` (GET /model).

`create_app` is the FastAPI app: POST /generate -> PNG (headers name the version and digest
that made it), GET /healthz, GET /model. `lcmlora serve` (flows/serve_cli.py) runs it with
uvicorn.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# At module level: FastAPI resolves the endpoints' string annotations in this module's globals.
from fastapi.responses import Response
from pydantic import BaseModel, Field

from components.registry.manifest import parse_reference
from components.registry.registry import Registry
from components.serve.pipeline_loader import apply_lcm_lora

POLL_S = 2.0  # how often the watcher reads the alias
RETRY_S = 60.0  # a version whose load failed is retried after this long (or when the alias moves)
MAX_STEPS = 50  # largest num_inference_steps a request may ask for

BaseFactory = Callable[[], tuple[Any, str | None]]  # -> (fresh diffusers pipeline, family)


class GenerateRequest(BaseModel):
    """The body of POST /generate."""

    prompt: str = Field(min_length=1, max_length=1000)
    steps: int = Field(4, ge=1, le=MAX_STEPS)  # LCM-LoRA's recommended 4
    guidance: float = Field(1.0, ge=0.0, le=20.0)  # 1.0: no classifier-free guidance
    seed: int = Field(0, ge=0, le=2**63 - 1)


def copying_factory(pipe: Any, family: str | None) -> BaseFactory:
    """A factory handing out deep copies of a pristine base `pipe` (loaded once, never served)."""
    import copy

    return lambda: (copy.deepcopy(pipe), family)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Served:
    """One loaded pipeline and the version in it."""

    pipe: Any
    version: str
    digest: str
    loaded_at: str
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Failure:
    version: str
    error: str
    at: str
    monotonic: float


class LoraSwapper:
    """Serve `ref` (NAME@ALIAS, NAME:VERSION, NAME@sha256:...) on pipelines from `base_factory`."""

    def __init__(self, registry: Registry, ref: str, base_factory: BaseFactory, *, fuse: bool = False,
                 poll_s: float = POLL_S, retry_s: float = RETRY_S):
        self.registry = registry
        self.ref = ref
        self.reference = parse_reference(ref)
        self.base_factory = base_factory
        self.fuse = fuse
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.active: Served | None = None
        self.failure: Failure | None = None
        self.swaps = 0
        self._swap_lock = threading.Lock()  # one load at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- loading and swapping ------------------------------------------------------------

    def load(self, version: str) -> Served:
        """A new pipeline with `version` loaded; the served one is untouched (raises on failure)."""
        pipe, family = self.base_factory()
        pipe.set_progress_bar_config(disable=True)
        manifest = apply_lcm_lora(pipe, f"{self.reference.name}:{version}", self.registry, family=family,
                                  fuse=self.fuse)
        return Served(pipe=pipe, version=manifest.version, digest=manifest.digest, loaded_at=_now())

    def check(self) -> bool:
        """Resolve the reference; if it points elsewhere, load that version and switch. True if swapped.

        A failed load is recorded (not raised) and the current version keeps serving; the same
        version is tried again after `retry_s`.
        """
        with self._swap_lock:
            _, version = self.registry.resolve(self.reference)
            if self.active is not None and self.active.version == version:
                self.failure = None if self.failure and self.failure.version == version else self.failure
                return False
            failed = self.failure
            if failed is not None and failed.version == version and time.monotonic() - failed.monotonic < self.retry_s:
                return False
            try:
                served = self.load(version)
            except Exception as exc:
                self.failure = Failure(version, f"{type(exc).__name__}: {exc}", _now(), time.monotonic())
                if self.active is None:
                    raise
                return False
            self.active = served  # the switch: one reference assignment, between requests
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
        """A PNG from the pipeline serving now, and which version made it."""
        import torch

        served = self.active
        if served is None:
            raise RuntimeError("no version loaded yet")
        with served.lock:
            image = served.pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                                generator=torch.Generator().manual_seed(seed)).images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), served

    def status(self) -> dict[str, Any]:
        """What GET /model reports: the version served and the last failed load, if any."""
        served = self.active
        failure = self.failure
        return {
            "ref": self.ref, "name": self.reference.name,
            "version": served.version if served else None, "digest": served.digest if served else None,
            "loaded_at": served.loaded_at if served else None, "fused": self.fuse, "swaps": self.swaps,
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
