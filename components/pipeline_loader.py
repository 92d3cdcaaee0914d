"""A diffusers pipeline ready for 4-step sampling with a LoRA pulled from the registry.

The consumer side of contract 5: pull a version (sha256-verified, through the registry's
cache) into a temporary checkout, check its family against the base's, load its weights as a
named adapter and switch the scheduler to LCMScheduler. The checkout is removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.lora_formats import LORA_WEIGHT_NAME
from components.registry import Registry
from components.registry_manifest import RegistryError


@contextlib.contextmanager
def _temporary_dir(parent: Path) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".load-{uuid.uuid4().hex[:12]}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def load_lcm_pipeline(ref: str, base: Any, registry: Registry, *, adapter_name: str = "lcm") -> Any:
    """A diffusers pipeline with the LoRA `ref` loaded and LCMScheduler set, for 4-step use.

    `base` is a base reference (folder, hub id, .safetensors; loaded with
    components.base_model.load_base) or an already-built diffusers pipeline.

        pipe = load_lcm_pipeline("toy-lcm-lora@production", "data/toy/base", Registry.from_params(params))
        image = pipe("a handwritten digit seven", num_inference_steps=4, guidance_scale=1.0).images[0]
    """
    from diffusers import LCMScheduler

    if isinstance(base, str | os.PathLike):
        from components.base_model import load_base

        loaded = load_base(str(base))
        pipe, family = loaded.pipe, loaded.family
    else:
        pipe, family = base, None
    with _temporary_dir(registry.cache_dir / "checkouts") as folder:
        result = registry.pull(ref, folder)
        lora_family = (result.manifest.base or {}).get("family")
        if family and lora_family and family != lora_family:
            raise RegistryError(f"{ref}: a LoRA for the {lora_family} family cannot load into a {family} base")
        weights = LORA_WEIGHT_NAME
        if not (folder / weights).is_file():
            candidates = sorted(p.name for p in folder.glob("*.safetensors"))
            if not candidates:
                raise RegistryError(f"{ref}: no .safetensors weights in the version")
            weights = candidates[0]
        pipe.load_lora_weights(str(folder), weight_name=weights, adapter_name=adapter_name)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe
