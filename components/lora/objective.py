"""Which acceleration objective a LoRA was distilled with, and how it samples.

An LCM-LoRA (Algorithm 1 of the report) samples with `LCMScheduler`, which re-injects noise
between steps. A PCM-LoRA (phased consistency, arXiv 2405.18407) maps each point to the lower
edge of its phase, so it samples deterministically at the phase edges: diffusers'
`TCDScheduler` with gamma 0 (passed to the pipeline as `eta`) and the edges as `timesteps=`
lands on them (`components/distill/pcm.py`, `pcm_sampling_timesteps`; TCD's own pick for
`num_inference_steps=M` is off the edges unless M divides the solver grid). Its recommended step
count is its number of phases.

The objective travels in the LoRA files' safetensors metadata under `lcmlora.objective`; a
file without it is an LCM-LoRA (every file written before the key existed is one), so LCM
artifacts are byte-for-byte what they were.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Objective = Literal["lcm", "pcm"]
OBJECTIVES: tuple[Objective, ...] = ("lcm", "pcm")
METADATA_KEY = "lcmlora.objective"  # JSON {"objective": "pcm", "phases": 4, "timesteps": [...]}; absent: lcm
LCM_STEPS = 4  # the report's headline 4-step sampling


@dataclass(frozen=True)
class SamplingRecipe:
    """How a distilled LoRA is meant to be sampled: what its card recommends and evaluation uses."""

    objective: Objective
    phases: int | None  # pcm: the phases M it was distilled with; lcm: None
    scheduler: Literal["LCMScheduler", "TCDScheduler"]
    steps: int  # recommended num_inference_steps
    eta: float | None  # passed to the pipeline call (TCD's gamma); None: not passed
    timesteps: tuple[int, ...] | None = None  # pcm: the trained phase edges [s_M .. s_1], passed as `timesteps=`

    @property
    def tag(self) -> str:
        """The card tag and registry name part: `lcm` or `pcm`."""
        return self.objective


def recipe(objective: Objective = "lcm", phases: int | None = None,
           timesteps: list[int] | tuple[int, ...] | None = None) -> SamplingRecipe:
    """The sampling recipe of an objective (`phases`: PCM's M, its recommended step count;
    `timesteps`: its phase edges on the trained solver grid, `pcm_sampling_timesteps`)."""
    if objective == "lcm":
        return SamplingRecipe("lcm", None, "LCMScheduler", LCM_STEPS, None)
    if objective == "pcm":
        if phases is None or phases < 1:
            raise ValueError(f"a PCM-LoRA needs its number of phases (got {phases!r})")
        if timesteps is not None and len(timesteps) != phases:
            raise ValueError(f"a {phases}-phase PCM-LoRA samples at {phases} edges, got timesteps {list(timesteps)}")
        edges = tuple(int(t) for t in timesteps) if timesteps is not None else None
        return SamplingRecipe("pcm", int(phases), "TCDScheduler", int(phases), 0.0, edges)
    raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")


def objective_metadata(r: SamplingRecipe) -> dict[str, str]:
    """The safetensors metadata that names a non-LCM objective (empty for LCM: the default)."""
    if r.objective == "lcm":
        return {}
    record = {"objective": r.objective, "phases": r.phases, "timesteps": list(r.timesteps) if r.timesteps else None}
    return {METADATA_KEY: json.dumps(record, sort_keys=True)}


def recipe_from_metadata(metadata: Mapping[str, str]) -> SamplingRecipe:
    """The recipe a LoRA file's metadata names; a file without `lcmlora.objective` is an LCM-LoRA."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return recipe("lcm")
    try:
        doc = json.loads(raw)
        return recipe(doc["objective"], doc.get("phases"), doc.get("timesteps"))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{METADATA_KEY} metadata {raw!r} is not a valid objective record ({err})") from None


def recipe_of_lora(path) -> SamplingRecipe:
    """The recipe of a LoRA file or artifact folder (reads the safetensors header only)."""
    from components.lora.formats import read_metadata
    from components.lora.io import lora_file

    return recipe_from_metadata(read_metadata(lora_file(path)))
