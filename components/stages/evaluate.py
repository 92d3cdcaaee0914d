"""The evaluate stage: one LoRA against its base -> metrics.json, report, gate verdict.

    output = evaluate_stage(params, base, storage)   # base: a ResolvedBase; the one call of every caller

`evaluate_stage` finds the LoRA by key (or takes the folder given), judges a copy of it in the
keyed folder `stages/evaluate/BASE/KEY` (or `output`) and stores the result. `run_evaluate`
loads the base once (the teacher is the same weights with the LoRA
disabled), runs the sampler matrix, measures every method with the base's judges, checks the
gate and writes the files into `output` and the LoRA folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import BaseConfig, ConfigError, EvaluateConfig, Params
from components.evaluate.evaluation import (
    EVALUATED_LORA,
    evaluate_lora,
    load_prompts,
    write_evaluation,
)
from components.evaluate.judges import Judges, load_judges
from components.lora.io import lora_file
from components.models.base_model import ResolvedBase
from components.progress import ProgressFn
from components.stages.inputs import distilled_lora, evaluation_rel
from components.stages.keys import output_rel
from components.storage.folder_sync import COMPLETE, pull_folder, push_folder, work_dir
from components.storage.storage import Storage

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


def run_evaluate(cfg: EvaluateConfig, *, base: ResolvedBase, lora_folder: Path, output: Path,
                 judges: Judges | None = None, progress: ProgressFn | None = None) -> EvaluateOutput:
    """Evaluate the LoRA in `lora_folder` on `base`; judges default to the base's provider."""
    lora_folder = Path(lora_folder)
    if not lora_folder.is_dir():
        raise FileNotFoundError(f"--lora {lora_folder}: no such folder; pass the LoRA artifact folder of "
                                "`lcmlora distill`")
    lora_file(lora_folder)  # a missing, truncated or garbage weights file fails here, named
    # 1. Judges and prompts first: a missing backbone fails before any sampling.
    judges = judges if judges is not None else load_judges(cfg, base.config, base.name)
    prompts = prompts_for(cfg, judges, base.name, base.config)
    # 2. The base, once; the teacher is the same weights with the LoRA disabled.
    pipe = base.load().pipe.to(cfg.device)
    # 3. Sampler matrix, metrics, gate.
    evaluation = evaluate_lora(pipe, lora_folder, cfg, judges, prompts, base_name=base.name,
                               teacher_guidance=base.config.guidance_scale, resolution=base.config.resolution,
                               progress=progress)
    evaluation.doc["base_fingerprint"] = base.fingerprint
    # 4. Files into `output` and the LoRA folder.
    paths = write_evaluation(evaluation, Path(output), lora_folder)
    gate = evaluation.doc["gate"]
    return EvaluateOutput(evaluation.doc, bool(gate["passed"]), tuple(gate["violations"]), paths)


@dataclass(frozen=True)
class EvaluateStageOutput:
    """What the evaluate stage did: the evaluation, where it is kept and the judged LoRA copy."""

    evaluation: EvaluateOutput
    folder: Path  # the local evaluation folder (the keyed folder itself on a local root)
    rel: str | None  # stages/evaluate/BASE/KEY below storage.root (None with an explicit output folder)
    lora_folder: Path  # folder/lora: the judged copy, the folder publish ships


def evaluate_stage(params: Params, base: ResolvedBase, storage: Storage, *, lora: Path | None = None,
                   output: Path | None = None, key: str | None = None, judges: Judges | None = None,
                   progress: ProgressFn | None = None) -> EvaluateStageOutput:
    """The evaluate stage's one call: a LoRA on its base -> metrics, report and gate, stored under its key.

    `lora` (a local LoRA folder) defaults to the distill stage's output of these params. The
    evaluation goes to `output`, else to the keyed folder `stages/evaluate/BASE/KEY` (`key` when
    the caller has computed it), and judges a copy of the LoRA there (`EVALUATION/lora/`).
    """
    # 1. The LoRA, and the folder that judges a copy of it.
    lora_dir = Path(lora) if lora is not None else pull_folder(storage, distilled_lora(params, storage, base))
    if output is not None:
        rel, folder = None, Path(output)
    else:
        rel = output_rel("evaluate", key, base.name) if key else evaluation_rel(params, base, lora_dir)
        folder = work_dir(storage, rel)
    judged = copy_for_evaluation(lora_dir, folder)
    # 2. The evaluation, then the folder stored under its key.
    evaluation = run_evaluate(params.evaluate, base=base, lora_folder=judged, output=folder, judges=judges,
                              progress=progress)
    if rel:
        push_folder(storage, folder, rel)
    return EvaluateStageOutput(evaluation, folder, rel, judged)
