"""The evaluate stage: one LoRA against its base -> metrics.json, report, gate verdict.

`lcmlora evaluate`, the Prefect evaluate task, dvc.yaml and the toy reproduction call
`run_evaluate`; it loads the base once (the teacher is the same weights with the LoRA
disabled), runs the sampler matrix, measures every method with the base's judges, checks the
gate and writes the files into `output` and the LoRA folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import BaseConfig, ConfigError, EvaluateConfig
from components.evaluate.evaluation import (
    EVALUATED_LORA,
    evaluate_lora,
    load_prompts,
    write_evaluation,
)
from components.evaluate.judges import Judges, load_judges
from components.lora.io import lora_file
from components.paths import project_path
from components.progress import ProgressFn
from components.storage.folder_sync import COMPLETE

NOT_EVALUATED = [COMPLETE, "checkpoints", "params.launch.yaml", "launch.log"]  # left out of that copy


@dataclass(frozen=True)
class EvaluateOutput:
    doc: dict[str, Any]  # the metrics document (metrics.json)
    passed: bool  # the gate's verdict
    violations: tuple[str, ...]  # every gate violation, in check order
    paths: dict[str, Path]  # metrics.json, report.md, report.html, samples.png, ...


def copy_for_evaluation(lora_folder: Path, evaluation_folder: Path) -> Path:
    """The copy of the LoRA an evaluation judges: `EVALUATION/lora/`, the folder publish ships.

    The evaluation writes its gate and report into the LoRA folder it judges, so it judges a
    copy; the distill output stays as distillation wrote it.
    """
    lora_file(lora_folder)  # the user's file named when it is unreadable, not the copy's
    local = Path(evaluation_folder) / EVALUATED_LORA
    shutil.copytree(lora_folder, local, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_EVALUATED))
    return local


def prompts_for(cfg: EvaluateConfig, judges: Judges, base_name: str, base: BaseConfig) -> list[str]:
    """The evaluation prompts: `evaluate.prompts`, else the prompt file the base's judges name."""
    prompt_file = cfg.prompts or judges.default_prompts
    if not prompt_file:
        raise ConfigError(f"evaluate.prompts is not set and the judges of bases.{base_name} "
                          f"({base.judges}) name no prompt file; set evaluate.prompts=/path/to/prompts.txt")
    return load_prompts(prompt_file)


def run_evaluate(cfg: EvaluateConfig, *, base_name: str, base: BaseConfig, lora_folder: Path, output: Path,
                 judges: Judges | None = None, progress: ProgressFn | None = None) -> EvaluateOutput:
    """Evaluate the LoRA in `lora_folder` on `base`; judges default to the base's provider."""
    from components.models.base_model import load_base

    lora_folder = Path(lora_folder)
    if not lora_folder.is_dir():
        raise FileNotFoundError(f"--lora {lora_folder}: no such folder; pass the LoRA artifact folder of "
                                "`lcmlora distill`")
    lora_file(lora_folder)  # a missing, truncated or garbage weights file fails here, named
    # 1. Judges and prompts first: a missing backbone fails before any sampling.
    judges = judges if judges is not None else load_judges(cfg, base, base_name)
    prompts = prompts_for(cfg, judges, base_name, base)
    # 2. The base, once; the teacher is the same weights with the LoRA disabled.
    loaded = load_base(str(project_path(base.reference)), family=base.family)
    pipe = loaded.pipe.to(cfg.device)
    # 3. Sampler matrix, metrics, gate.
    evaluation = evaluate_lora(pipe, lora_folder, cfg, judges, prompts, base_name=base_name,
                               teacher_guidance=base.guidance_scale, resolution=base.resolution,
                               progress=progress)
    evaluation.doc["base_fingerprint"] = loaded.fingerprint
    # 4. Files into `output` and the LoRA folder.
    paths = write_evaluation(evaluation, Path(output), lora_folder)
    gate = evaluation.doc["gate"]
    return EvaluateOutput(evaluation.doc, bool(gate["passed"]), tuple(gate["violations"]), paths)
