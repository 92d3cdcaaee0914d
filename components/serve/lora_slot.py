"""The hot-swap slot: one LoRA adapter in the served pipeline, its weights replaced in place.

diffusers' order (`load_lora_weights(hotswap=...)` docs): `enable_lora_hotswap(target_rank=N)`
before the first adapter is loaded (peft then pads the adapter to rank N and turns its scalings
into tensors), then compile; later versions are copied into the same tensors
(`load_lora_weights(..., hotswap=True)`), so a compiled UNet is not recompiled.

A version fits the slot when it has UNet layers only, all of them among the first version's,
at rank N or below. `misfits` checks this before anything is touched, because diffusers does
not: a larger rank is swapped in as larger tensors (a recompile, and the slot outgrows N), and a
hot-swap it refuses part-way deletes the adapter, leaving the bare base. `restore` loads the
previous version back after such a failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.lora.formats import read_lora_file, split_peft_key
from components.serve.pipeline_loader import load_lora_file, set_lcm_scheduler

ADAPTER = "lcm"  # the adapter name the slot lives under


class SlotMisfit(ValueError):
    """A LoRA version that cannot be hot-swapped into the slot; the message says what to do."""


def lora_ranks(weights: Path) -> dict[str, int]:
    """{`component.MODULE`: rank} of a diffusers/peft or kohya LoRA file (rank = rows of lora_A)."""
    tensors, _ = read_lora_file(weights)
    ranks = {}
    for key, tensor in tensors.items():
        component, module, ab = split_peft_key(key)
        if ab == "A":
            ranks[f"{component}.{module}"] = tensor.shape[0]
    return ranks


def slot_layers(unet: Any, adapter_name: str = ADAPTER) -> set[str]:
    """The `unet.MODULE` names that hold adapter `adapter_name` (empty before the first load)."""
    from peft.tuners.lora import LoraLayer

    return {f"unet.{name}" for name, module in unet.named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A}


def _listed(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def misfits(ranks: dict[str, int], slot: set[str] | None, max_rank: int) -> list[str]:
    """Every reason a LoRA with `ranks` cannot go into a slot of rank `max_rank` over the `slot`
    layers (None: the slot is still empty, any UNet layers will do). Empty: it fits."""
    problems = []
    not_unet = sorted(m for m in ranks if not m.startswith("unet."))
    if not_unet:
        problems.append(f"{len(not_unet)} text-encoder layers ({_listed(not_unet)}): diffusers cannot hot-swap "
                        "those; serve this LoRA with --fuse (each version loaded into a fresh pipeline)")
    too_high = sorted((m for m in ranks if ranks[m] > max_rank), key=lambda m: -ranks[m])
    if too_high:
        top = ranks[too_high[0]]
        problems.append(f"rank {top} in {len(too_high)} layers ({_listed(too_high)}) is above the hot-swap "
                        f"slot's rank {max_rank}: restart `lcmlora serve` with --max-rank {top}")
    if slot is not None:
        outside = sorted(m for m in ranks if m.startswith("unet.") and m not in slot)
        if outside:
            problems.append(f"{len(outside)} layers outside the hot-swap slot ({_listed(outside)}; the slot holds "
                            f"the {len(slot)} layers of the version loaded at start): restart `lcmlora serve` "
                            "to serve this version, the slot then takes its layers")
    return problems


def open_slot(pipe: Any, weights: Path, *, max_rank: int, compile_backend: str | None = None) -> None:
    """Load the first version into an empty `pipe` as a slot of rank `max_rank`; compile the UNet if asked."""
    # 1. Before the first load: peft pads to max_rank and makes the scalings tensors while loading.
    pipe.enable_lora_hotswap(target_rank=max_rank)
    load_lora_file(pipe, weights, ADAPTER)
    set_lcm_scheduler(pipe)
    # 2. Compile after the slot has its final shapes, so later swaps meet the same graph.
    if compile_backend is not None:
        pipe.unet.compile(backend=compile_backend)


def swap(pipe: Any, weights: Path) -> None:
    """Copy a version that fits (`misfits` empty) into the slot's tensors."""
    load_lora_file(pipe, weights, ADAPTER, hotswap=True)


def restore(pipe: Any, weights: Path, *, max_rank: int) -> None:
    """Put the version in `weights` (one that was in the slot before) back after a failed `swap`."""
    if ADAPTER in getattr(pipe.unet, "peft_config", {}):  # the failure left the adapter: swap it back
        swap(pipe, weights)
        return
    # diffusers deleted the adapter: load it afresh the slot's way (a compiled UNet recompiles once).
    pipe.enable_lora_hotswap(target_rank=max_rank, check_compiled="ignore")
    load_lora_file(pipe, weights, ADAPTER)
