"""A diffusers pipeline ready for 4-step sampling with a LoRA pulled from the registry.

The consumer side of contract 5: pull a version (sha256-verified, through the registry's
cache) into a temporary checkout, check its family against the base's, load its weights as a
named adapter (optionally fused into the base weights) and switch the scheduler to
LCMScheduler. The checkout is removed afterwards. `components/serve/server.py` builds on it
(`pulled_lora` keeps the checkout open while the server decides whether and how to switch).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.lora.formats import LORA_WEIGHT_NAME
from components.registry.manifest import Manifest, RegistryError
from components.registry.registry import Registry


@contextlib.contextmanager
def _temporary_dir(parent: Path) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".load-{uuid.uuid4().hex[:12]}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def load_base_pipeline(base: Any) -> tuple[Any, str | None]:
    """(pipeline, family) for a base reference (folder, hub id, .safetensors) or a built pipeline."""
    if isinstance(base, str | os.PathLike):
        from components.models.base_model import load_base

        loaded = load_base(str(base))
        return loaded.pipe, loaded.family
    return base, None


@contextlib.contextmanager
def pulled_lora(ref: str, registry: Registry, *, family: str | None = None) -> Iterator[tuple[Manifest, Path]]:
    """Pull `ref` (verified) into a temporary checkout and check its family against `family`;
    yields (manifest, its .safetensors weights file). The checkout is removed on exit."""
    with _temporary_dir(registry.cache_dir / "checkouts") as folder:
        result = registry.pull(ref, folder)
        lora_family = (result.manifest.base or {}).get("family")
        if family and lora_family and family != lora_family:
            raise RegistryError(f"{ref}: a LoRA for the {lora_family} family cannot load into a {family} base")
        weights = folder / LORA_WEIGHT_NAME
        if not weights.is_file():
            candidates = sorted(folder.glob("*.safetensors"))
            if not candidates:
                raise RegistryError(f"{ref}: no .safetensors weights in the version")
            weights = candidates[0]
        yield result.manifest, weights


def load_lora_file(pipe: Any, weights: Path, adapter_name: str, *, hotswap: bool = False) -> None:
    """`pipe.load_lora_weights` from one .safetensors file; `hotswap` replaces the adapter's weights in place."""
    pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=adapter_name,
                           hotswap=hotswap)


def set_lcm_scheduler(pipe: Any) -> None:
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)


def apply_lcm_lora(pipe: Any, ref: str, registry: Registry, *, family: str | None = None,
                   adapter_name: str = "lcm", fuse: bool = False) -> Manifest:
    """Pull `ref` (verified), load it into `pipe` as `adapter_name` (fused if asked) and set
    LCMScheduler; returns the manifest of the version loaded. Nothing is loaded if the pull fails."""
    with pulled_lora(ref, registry, family=family) as (manifest, weights):
        load_lora_file(pipe, weights, adapter_name)
    if fuse:
        pipe.fuse_lora(adapter_names=[adapter_name])
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    set_lcm_scheduler(pipe)
    return manifest


def load_lcm_pipeline(ref: str, base: Any, registry: Registry, *, adapter_name: str = "lcm",
                      fuse: bool = False) -> Any:
    """A diffusers pipeline with the LoRA `ref` loaded and LCMScheduler set, for 4-step use.

    `base` is a base reference (folder, hub id, .safetensors; loaded with
    components.models.base_model.load_base) or an already-built diffusers pipeline. `fuse` merges the
    LoRA into the base weights (no per-step adapter cost; see docs/benchmarks.md).

        pipe = load_lcm_pipeline("toy-lcm-lora@production", "data/toy/base", Registry.from_params(params))
        image = pipe("a handwritten digit seven", num_inference_steps=4, guidance_scale=1.0).images[0]
    """
    pipe, family = load_base_pipeline(base)
    apply_lcm_lora(pipe, ref, registry, family=family, adapter_name=adapter_name, fuse=fuse)
    return pipe
