"""Preflight: every stage's inputs and settings for every base of a run, checked before any stage runs.

A run that would fail in evaluate after hours of distillation fails here in seconds instead,
with one error naming every problem at once:

    preflight(params)                       # every base in params (the nightly)
    preflight(params, {"my-ft": base_cfg})  # the bases of this run (new-base)

Each stage has its own small check `(params, base_name, base) -> list[str]`; the judges
provider a base declares (`bases.NAME.judges`) checks itself (components/evaluate/judges.py). Checks
only look: nothing is loaded, downloaded or written, and S3 locations are left to the stages.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from components.config import BaseConfig, ConfigError, Params
from components.paths import project_path

Check = Callable[[Params, str, BaseConfig], list[str]]


class PreflightError(ConfigError):
    """A run that cannot succeed: lists every problem found before any stage ran."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"preflight found {len(problems)} problem(s) before any stage ran; fix them in params "
                         "(or with --set) and rerun:\n  - " + "\n  - ".join(problems))


def _is_s3(location: str) -> bool:
    return location.startswith("s3://")


def _writable(key: str, location: str) -> list[str]:
    """A local folder that exists and is writable, or can be created under a writable parent."""
    if _is_s3(location):
        return []
    path = Path(location).expanduser().absolute()
    if path.exists() and not path.is_dir():
        return [f"{key}={location}: exists and is not a folder; point it at a folder"]
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{key}={location}: {existing} is not writable; choose a writable folder or fix its permissions"]
    return []


def _cuda_missing(key: str, device: str) -> list[str]:
    if not device.startswith("cuda"):
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return [f"{key}={device}: no CUDA device is available here; set {key}=cpu or run on a GPU machine"]


# --- one check per stage ------------------------------------------------------------------


def base_problems(params: Params, name: str, base: BaseConfig) -> list[str]:
    """The base's weights: a local folder or .safetensors that exists, or a hub id (the loaders' own check)."""
    from components.models.base_model import check_reference

    try:
        check_reference(base.reference)
    except FileNotFoundError as err:
        return [f"bases.{name}.reference: {err}"]
    return []


def storage_problems(params: Params, name: str, base: BaseConfig) -> list[str]:
    """Every stage writes under storage.root; publish writes under registry.root."""
    return _writable("storage.root", params.storage.root) + _writable("registry.root", params.registry.root)


def curate_problems(params: Params, name: str, base: BaseConfig) -> list[str]:
    """The source folder with metadata files, unless the run writes the toy source into it first."""
    source = params.curate.source
    if _is_s3(source):
        return []
    folder = project_path(source)
    toy_dir = params.toy.get("source_dir", "data/toy/source")
    if params.orchestrate.toy_source_if_missing and folder.resolve() == project_path(toy_dir).resolve():
        return []  # the nightly and new-base flows write the toy source there first (lcmlora.sources)
    if not folder.is_dir():
        return [(f"curate.source={source}: no such folder; point it at a LAION/img2dataset folder (metadata "
                "parquet + tar shards) or an s3:// URL")]
    if not any(folder.glob(params.curate.metadata)):
        return [f"curate.source={source}: no metadata file matches curate.metadata={params.curate.metadata!r}"]
    return []


def encode_problems(params: Params, name: str, base: BaseConfig) -> list[str]:
    """The VAE's device."""
    return _cuda_missing("encode.device", params.encode.device)


def distill_problems(params: Params, name: str, base: BaseConfig) -> list[str]:
    """The accelerate config file and CUDA-only optimizers."""
    problems = []
    accel = params.orchestrate.accelerate_config
    if accel and not project_path(accel).is_file():
        problems.append(f"orchestrate.accelerate_config={accel}: no such file (see infra/accelerate/)")
    if params.distill.optimizer == "adamw_8bit" and not params.distill.cpu:
        problems += _cuda_missing("distill.optimizer", "cuda")  # bitsandbytes' 8-bit AdamW needs CUDA
    return problems


def evaluate_problems(params: Params, name: str, base: BaseConfig) -> list[str]:
    """The judges the base declares (bases.NAME.judges), the prompt file, the device."""
    from components.evaluate.judges import judges_problems

    problems = judges_problems(params.evaluate, base, name)
    prompts = params.evaluate.prompts
    if prompts and not project_path(prompts).is_file():
        problems.append(f"evaluate.prompts={prompts}: no such file; one prompt per line")
    return problems + _cuda_missing("evaluate.device", params.evaluate.device)


def merge_problems(params: Params, name: str, base: BaseConfig) -> list[str]:
    """The style LoRA the LCM-LoRA is merged with."""
    style = params.merge.style_file
    if project_path(style).is_file():
        return []
    return [(f"merge.style_file={style}: no such file; point it at a style LoRA .safetensors "
            "(the toy one: `lcmlora toy style-lora`)")]


STAGE_CHECKS: dict[str, Check] = {
    "base": base_problems, "storage": storage_problems, "curate": curate_problems, "encode": encode_problems,
    "distill": distill_problems, "evaluate": evaluate_problems, "merge": merge_problems,
}
SHARED = ("storage", "curate", "encode", "distill", "merge")  # same answer for every base: said once


def problems(params: Params, bases: Mapping[str, BaseConfig] | None = None) -> list[str]:
    """Every problem of the run, in stage order; a per-base problem is prefixed with the base's name."""
    bases = params.bases if bases is None else bases
    if not bases:
        return ["bases: no bases to run; add one under `bases:` in params"]
    found: list[str] = []
    for stage, check in STAGE_CHECKS.items():
        for name, base in bases.items():
            for problem in check(params, name, base):
                line = problem if stage in SHARED else f"{name}: {problem}"
                if line not in found:
                    found.append(line)
    return found


def preflight(params: Params, bases: Mapping[str, BaseConfig] | None = None) -> None:
    """Raise PreflightError naming every problem of the run (all bases, all stages); else return."""
    found = problems(params, bases)
    if found:
        raise PreflightError(found)
