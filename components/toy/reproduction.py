"""The toy reproduction of the LCM-LoRA report's central claim: a few LCM steps do the work of
many teacher steps (`lcmlora reproduce --toy`, and `--toy --hard` for the hard toy).

`run_reproduction` runs the stage runners (components/stages/) on one toy world, in order:
source (if missing) -> curate -> encode -> distill -> evaluate, then checks that world's goals
against the evaluation's metric rows. A `ToyWorld` names what differs between worlds: the
base, the source writer and the goals. This module holds the shared runner and the easy toy
(`EASY_TOY`); the hard toy's world is `components/toy/hard/reproduction.py`. On the easy toy
the teacher is already decent at 4 steps, so the claim shows at 1 and 2 steps.
Every cell is reported whatever it shows; a goal that is not met is reported as such.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.config import Params
from components.evaluate.gate import GateResult, Rule, check_rules, for_student
from components.paths import project_path
from components.progress import Progress, ProgressFn, no_progress
from components.storage.storage import Storage
from components.toy.source import check_source_settings, write_source

TOY_BASE = "toy"  # the params base the easy reproduction runs on
STAGES = ("curate", "encode", "distill", "evaluate")

# The distillation recipe of the toy trial in the issue (rank 16, lr 5e-4, batch 64, 400 steps;
# the toy's guidance 2.0 comes from bases.toy.guidance_scale), plus LCMScheduler rows on the
# teacher alone so the table shows what distillation adds. Applied under the user's --set.
TOY_RECIPE = ["distill.lora_rank=16", "distill.lora_alpha=16", "distill.lr=5.0e-4", "distill.batch_size=64",
              "distill.max_steps=400", "evaluate.lcm_without_lora=true"]

TEACHER_4 = ("ddim-4", "dpmpp-4")
TEACHER_50 = ("ddim-50", "dpmpp-50")
TOY_GOALS = [  # FD over the digit classifier's features; adherence is digit accuracy
    Rule("goal lcm2_fd_le_teacher4", "fd", "lcm-2", TEACHER_4),
    Rule("goal lcm4_fd_le_teacher4", "fd", "lcm-4", TEACHER_4),
    Rule("goal lcm4_fd_le_1.5x_teacher50", "fd", "lcm-4", TEACHER_50, 1.5),
    Rule("goal lcm4_accuracy_ge_0.9x_teacher50", "adherence", "lcm-4", TEACHER_50, 0.9),
    Rule("goal lcm1_accuracy_ge_0.9", "adherence", "lcm-1", constant=0.9),
    Rule("goal lcm1_fd_le_half_ddim1", "fd", "lcm-1", ("ddim-1",), 0.5),
]


@dataclass(frozen=True)
class ToyWorld:
    """What one toy reproduction runs on and checks."""

    base_name: str  # the params base (bases.NAME) distilled and evaluated
    build_hint: str  # the command that builds that base, named when it is missing
    write_source: Callable[[Path, Params], Any]  # writes the LAION-format source to a folder
    goals: list[Rule]  # checked against the evaluation's metric rows
    # what an existing source's toy_summary.json must say for `params` ({key: (value, when the key is
    # missing)}): a source written with other settings is refused, never read as if it were this one's
    source_settings: Callable[[Params], dict[str, tuple[Any, Any]]] | None = None


EASY_TOY = ToyWorld(TOY_BASE, "lcmlora toy base", write_source, TOY_GOALS)


@dataclass
class Reproduction:
    evaluation_doc: dict[str, Any]
    goals: GateResult
    seconds: dict[str, float] = field(default_factory=dict)  # per stage and total
    machine: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def check_goals(doc: dict[str, Any], goals: list[Rule] | None = None) -> GateResult:
    """The reproduction goals against an evaluation's metric rows (missing metrics fail); a PCM-LoRA's
    evaluation is judged on its own rows (`pcm-N` where a goal names `lcm-N`)."""
    rows = {row["label"]: row for row in doc["methods"]}
    student = doc.get("info", {}).get("objective", "lcm")
    return check_rules([for_student(rule, student) for rule in goals or TOY_GOALS], rows)


def machine_info() -> dict[str, Any]:
    """What ran it: CPU, cores, torch threads, platform."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def goals_markdown(goals: GateResult) -> str:
    """One line per goal: met / NOT met, with the values compared."""
    lines = []
    for check in goals.checks:
        value = "-" if check.get("value") is None else f"{check['value']:.4g}"
        bound = "-" if check.get("bound") is None else f"{check['bound']:.4g}"
        status = "met" if check["passed"] else "NOT met"
        lines.append(f"- {check['key'].removeprefix('goal ')}: {check['rule']}: {value} vs {bound}: **{status}**")
    return "\n".join(lines)


def run_reproduction(world: ToyWorld, params: Params, output: str | Path, *,
                     progress: ProgressFn | None = None) -> Reproduction:
    """source -> curate -> encode -> distill -> evaluate -> goals of one toy world, all under `output`.

    Only the stage runners (components/stages/) do the work. `params` should already point
    storage.root under `output` (the CLI does so): the manifest and shards go to their keyed
    folders there (docs/data.md, "Output layout"), the LoRA to `output/lora` and its evaluation
    to `output/evaluation`, so a reproduction never reuses or overwrites another run's artifacts. `progress` gets each
    stage's own reports and one `reproduce` report per finished stage (its note says what it did).
    """
    from components.models.base_model import fingerprint_base
    from components.stages.curate import curate_stage
    from components.stages.distill import distill_stage
    from components.stages.encode import encode_stage
    from components.stages.evaluate import evaluate_stage

    report = progress or no_progress
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    base_name = world.base_name
    base = params.base(base_name)
    if not (project_path(base.reference) / "model_index.json").is_file():
        raise FileNotFoundError(f"bases.{base_name}.reference={base.reference}: the toy base is missing; "
                                f"build it with `{world.build_hint}`")

    def done(step: int, stage: str, note: str) -> None:
        report(Progress(stage="reproduce", step=step, total=len(STAGES), note=f"{stage}: {note}",
                        metrics={"seconds": round(seconds[stage], 1)}))

    # 1. The toy source (LAION/img2dataset layout), written once if absent.
    source_dir = project_path(params.curate.source)
    if not source_dir.exists():
        t0 = time.perf_counter()
        world.write_source(source_dir, params)
        seconds["toy_source"] = time.perf_counter() - t0
        done(0, "toy_source", f"written to {source_dir}")
    elif world.source_settings is not None:
        check_source_settings(source_dir, world.source_settings(params))
    params = params.model_copy(update={"curate": params.curate.model_copy(update={"source": str(source_dir)})})
    storage = Storage.from_config(params.storage)
    resolved = fingerprint_base(base_name, base, keep_loaded=True)  # loaded once: encoding takes its VAE

    # 2. Curate.
    t0 = time.perf_counter()
    curated = curate_stage(params, storage, min_side=base.resolution, progress=progress)
    seconds["curate"] = time.perf_counter() - t0
    done(1, "curate", f"kept {curated.kept} of {curated.rows_in} rows")
    # 3. Encode.
    t0 = time.perf_counter()
    encoded = encode_stage(params, resolved, storage, manifest=curated.manifest, progress=progress)
    seconds["encode"] = time.perf_counter() - t0
    done(2, "encode", f"{encoded.samples} latents")
    # 4. Distill.
    t0 = time.perf_counter()
    lora_folder = output / "lora"
    distilled = distill_stage(params, resolved, storage, index=encoded.index, output=lora_folder, progress=progress)
    seconds["distill"] = time.perf_counter() - t0
    done(3, "distill", f"{distilled.metrics['steps']} steps -> {lora_folder}")
    # 5. Evaluate.
    t0 = time.perf_counter()
    evaluated = evaluate_stage(params, resolved, storage, lora=lora_folder, output=output / "evaluation",
                               progress=progress).evaluation
    seconds["evaluate"] = time.perf_counter() - t0
    done(4, "evaluate", "gate " + ("passed" if evaluated.passed else "FAILED"))
    seconds["total"] = time.perf_counter() - t_all

    # 6. Goals, and the record of what ran where.
    goals = check_goals(evaluated.doc, world.goals)
    result = Reproduction(evaluated.doc, goals, {k: round(v, 1) for k, v in seconds.items()}, machine_info(),
                          dict(evaluated.paths))
    record = {"base": base_name, "goals": goals.to_dict(), "seconds": result.seconds, "machine": result.machine,
              "distill": {k: v for k, v in params.distill.model_dump(mode="json").items()},
              "evaluation": evaluated.doc}
    (output / "reproduction.json").write_text(json.dumps(record, indent=2) + "\n")
    result.paths["reproduction.json"] = output / "reproduction.json"
    return result
