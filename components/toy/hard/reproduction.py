"""The hard toy's reproduction (`lcmlora reproduce --toy --hard [--family sd15|sdxl|both]`).

The shared runner (`components/toy/reproduction.py:run_reproduction`) runs the real stages on
each hard base; this module says what differs: the two hard bases, the hard source, the
distillation recipe and the goals of issue 12 (item 3).

The hard bases are not in params.yaml: `bases` drives the nightly, whose embedded default stays
the easy toy (minutes from a fresh clone). `hard_overrides(family)` adds a family's base and
recipe as `--set`-style overrides put *before* the user's, so every value here can still be
overridden (`--set bases.toy-hard.reference=/tmp/base`, `--set distill.max_steps=50`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from components.config import Params
from components.evaluate.gate import GateResult, Rule
from components.toy.hard.config import FAMILIES, HardToyConfig, hard_toy_config
from components.toy.hard.source import source_settings, write_source
from components.toy.reproduction import ToyWorld

HARD_BASES: dict[str, dict[str, object]] = {
    "toy-hard": {"reference": HardToyConfig().base_dir, "family": "sd15", "resolution": 64,
                 "guidance_scale": 5.0, "judges": "toy-hard"},
    "toy-hard-xl": {"reference": HardToyConfig().sdxl_dir, "family": "sdxl", "resolution": 64,
                    "guidance_scale": 5.0, "judges": "toy-hard"},
}
BUILD_HINT = {"sd15": "lcmlora toy base --hard", "sdxl": "lcmlora toy base --hard --sdxl"}

# Distillation and evaluation of the hard reproduction, applied under the user's --set.
# Distill: the toy recipe's rank and learning rate at batch 32; the steps (FAMILY_RECIPE) sized
# so that one family's whole reproduction fits 30 min on the 2-core build machine
# (docs/toy-hard.md, "Reproduction": measured 1.6 s (SD-1.5) and 2.4 s (SDXL) per step).
# Evaluate: LCM at 2, 4, 8 steps; the teacher (DDIM, DPM-Solver++) at the same counts and at 25;
# LCMScheduler on the teacher alone; 40 prompts x 5 samples = 200 images per method.
HARD_RECIPE = [
    "distill.lora_rank=16", "distill.lora_alpha=16", "distill.lr=5.0e-4", "distill.batch_size=32",
    "distill.checkpoint_every=100",
    "evaluate.steps=[2,4,8]", "evaluate.teacher_steps=[25]", "evaluate.teacher_samplers=[ddim,dpmpp]",
    "evaluate.lcm_without_lora=true", "evaluate.samples_per_prompt=5", "evaluate.batch_size=100",
    "evaluate.agreement_reference=ddim-25",
    # the hard gate (issue 12, item 5; chosen in docs/results.md from the first runs): the two ratio
    # thresholds against the teacher at 25 steps (no 50-step rows here). Adherence does the work: both
    # broken variants drew LCM-4 FDs *below* DPM-Solver++-4's (759, 829 vs 993) and the good run
    # passed FD(lcm-4) <= FD(dpmpp-4) by 1% only, so that rule is off here (it could only flip on a seed).
    "evaluate.gate_teacher_steps=25", "evaluate.lcm4_fd_max_ratio_to_teacher50=1.2",
    "evaluate.adherence_min_ratio=0.8", "evaluate.lcm4_fd_below_dpm4=false",
    # session 6, on the 3-level bases: LCMScheduler without the LoRA reads 0.85 at 4 steps (SDXL family)
    # and 0.565 at 2, where the distilled LoRA reads 0.865: at 2 steps a broken distillation shows
    "evaluate.lcm2_adherence_min_ratio=0.75",
    # session 8, SD-1.5 family on its decoder-tuned base: the 10-step LoRA passed both adherence rules (LCM-2
    # 0.885, LCMScheduler alone 0.855) and the FD rule; its LCM-2 PSNR against the teacher's DDIM-25 image from
    # the same noise was 20.07 dB (LCMScheduler alone 19.46), the good seeds' 21.93-22.89: the rule sits between,
    # chosen before seed 4 and the no-guidance run finished (docs/results.md, "Session 8")
    "evaluate.lcm2_psnr_min=21.0",
    # session 16, PCM (4 phases): the 10-step PCM-LoRA PASSED the gate above (PCM-2 adherence 0.84, PCM-4 0.89,
    # PCM-2 PSNR 21.86 dB): PCM's edge sampler follows the teacher even barely trained. Seeds 0-3 read
    # 25.47-25.90 dB; the bound sits between, chosen before the no-guidance run and seed 4 finished
    # (docs/results.md, "Gate, SD-1.5 family, PCM")
    "evaluate.pcm2_psnr_min=23.5",
    # issue 29: both objectives with CFG at 1.5 and 3 and a negative prompt (the scene with its sides swapped)
    "evaluate.cfg_scales=[1.5,3]", "evaluate.cfg_steps=[4]", "evaluate.negative_prompts=data/prompts/toy-hard-negative.txt",
    f"curate.source={HardToyConfig().source_dir}",
]
# The SD-1.5 family does not know crops: only square originals, whose centre crop is the whole
# scene (the source adds paper right or bottom). The SDXL family keeps them all: it is told
# each crop through `original_size` / `crop_top_left`.
FAMILY_RECIPE = {"sd15": ["curate.max_aspect=1.0", "distill.max_steps=1500"], "sdxl": ["distill.max_steps=1500"]}

TEACHER = ("ddim", "dpmpp")


def teacher(steps: int) -> tuple[str, ...]:
    """The teacher's rows at `steps` steps (the goals take the best of them)."""
    return tuple(f"{sampler}-{steps}" for sampler in TEACHER)


HARD_GOALS = [  # issue 12, item 3; FD over the hard judges' features, adherence = all four parts right
    Rule("goal lcm4_fd_le_1.2x_teacher25", "fd", "lcm-4", teacher(25), 1.2),
    Rule("goal lcm4_adherence_ge_0.95x_teacher25", "adherence", "lcm-4", teacher(25), 0.95),
    Rule("goal lcm4_fd_le_teacher4", "fd", "lcm-4", teacher(4)),
    Rule("goal lcm4_fd_le_teacher8", "fd", "lcm-4", teacher(8)),
    Rule("goal lcm2_fd_le_teacher4", "fd", "lcm-2", teacher(4)),
    Rule("goal lcm4_fd_le_0.7x_lcm_base4", "fd", "lcm-4", ("lcm_base-4",), 0.7),
    Rule("goal lcm8_fd_le_1.1x_lcm4", "fd", "lcm-8", ("lcm-4",), 1.1),
]


def family_base(family: str) -> str:
    """The params base a hard family runs on; ValueError naming the families for any other."""
    if family not in FAMILIES:
        raise ValueError(f"--family {family!r}: expected one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def hard_overrides(family: str) -> list[str]:
    """The `--set` overrides that add both hard bases (so a user's `--set bases.toy-hard-xl.KEY=...`
    resolves in every family's run), the hard recipe and the family's own part of it."""
    family_base(family)
    bases = [f"bases.{name}.{key}={value}" for name, base in HARD_BASES.items() for key, value in base.items()]
    return bases + HARD_RECIPE + FAMILY_RECIPE[family]


def hard_world(family: str) -> ToyWorld:
    """The reproduction of one hard family."""
    return ToyWorld(family_base(family), BUILD_HINT[family], write_source, HARD_GOALS, source_settings)


def run_merge_claim(params: Params, lcm_folder: Path, output: Path, progress=None,
                    base_distill_seconds: float | None = None,
                    base_name: str = "toy-hard") -> tuple[dict, GateResult, dict | None]:
    """`reproduce --toy --hard --merge`, per family: the hard style set and the family's style LoRA of
    toy.hard.style if missing (toy.hard.style_dir; style_lora.style_lora_folder), then the merge stage at
    (0.8, 1.0) with the LCM-LoRA in `lcm_folder` on bases.`base_name` (toy-hard, toy-hard-xl), into
    `output`; where the merge lost the style and `merge.fallback` is distill, the style-distill stage (the
    style model's own LCM-LoRA, issue 28) after it. Returns the merge metrics, the claim's checks and the
    variant's record (None without a fallback): its row, its seconds per step, its evaluation gate and
    issue 28's goals (`base_distill_seconds`: the cost goal's bound)."""
    from components.models.base_model import fingerprint_base
    from components.paths import project_path
    from components.stages.merge import merge_stage
    from components.stages.style_distill import style_distill_stage
    from components.storage.storage import Storage
    from components.toy.hard.merge_claim import (
        CLAIM_WEIGHTS,
        check_merge_claim,
        check_style_variant,
    )
    from components.toy.hard.style_lora import run_hard_style_lora, style_lora_folder

    hard = hard_toy_config(params)
    family = next(fam for fam, name in FAMILIES.items() if name == base_name)
    style_folder = project_path(style_lora_folder(hard, family))
    if not (style_folder / "pytorch_lora_weights.safetensors").is_file():
        run_hard_style_lora(params, style_folder, progress=progress, family=family)
    claim = params.model_copy(update={"merge": params.merge.model_copy(update={
        "weights": [CLAIM_WEIGHTS], "lcm_steps": 4, "reference_steps": 25, "svd_rank": None, "save_fused": "none"}),
        "evaluate": params.evaluate.model_copy(update={"style": params.evaluate.style or hard.style})})
    # The base's judges and prompts (bases.toy-hard.judges: the hard toy's digit judges, scoring toy.hard.style).
    base = fingerprint_base(base_name, params.base(base_name), keep_loaded=True)
    storage = Storage.from_config(params.storage)
    result = merge_stage(claim, base, storage, lcm=lcm_folder, style=style_folder, output=output,
                         progress=progress).merge
    doc = result.doc
    variant = None
    if doc.get("selection", {}).get("style_lost") and params.merge.fallback == "distill":
        styled = style_distill_stage(claim, base, storage, style=style_folder, merge_doc=doc, progress=progress)
        seconds = json.loads((styled.folder / "metrics.json").read_text()).get("seconds", {})
        goals = check_style_variant(doc, styled.row, seconds, base_distill_seconds)
        variant = {"folder": str(styled.folder), "row": styled.row, "seconds": seconds, "reused": styled.reused,
                   "gate": {"passed": styled.passed, "violations": list(styled.violations)},
                   "goals": goals.to_dict(), "base_distill_seconds": base_distill_seconds}
        (output / "style_variant.json").write_text(json.dumps(variant, indent=2) + "\n")
    return doc, check_merge_claim(doc), variant


# Issue 12, item 5: the gate with margins. A good distillation must pass the gate on any seed, a
# deliberately broken one must fail it (naming the rule). `--seeds` repeats the family's real
# distillation with other `distill.seed`s; `--broken NAME` runs one of these instead:
BROKEN = {
    "no-guidance": "distill.guidance_range.{base}=[1.0,1.0]",  # teacher w = 0: no CFG distilled into the LoRA
    "ten-steps": "distill.max_steps=10",  # stopped almost at once
}


@dataclass(frozen=True)
class GateRun:
    """One distillation of a gate-margin check: its label, extra overrides and the gate it must give."""

    label: str  # seed-N or broken-NAME: the run's folder under the family's output
    overrides: tuple[str, ...]
    gate_must_pass: bool


# A gate run evaluates the rows the gate reads (LCM-4, the teacher at 4 and 25 steps), not the whole
# table: the distillation is the real one, the evaluation a third of the full recipe's.
GATE_ROWS = ("evaluate.steps=[2,4]", "evaluate.lcm_without_lora=false")


def gate_runs(family: str, seeds: list[int], broken: list[str]) -> list[GateRun]:
    """The runs of a gate-margin check for one family: each seed (must pass), each broken variant (must fail)."""
    unknown = [name for name in broken if name not in BROKEN]
    if unknown:
        raise ValueError(f"--broken {', '.join(unknown)}: expected one of {', '.join(BROKEN)}")
    base = family_base(family)
    return ([GateRun(f"seed-{s}", (*GATE_ROWS, f"distill.seed={s}"), True) for s in seeds]
            + [GateRun(f"broken-{name}", (*GATE_ROWS, BROKEN[name].format(base=base)), False) for name in broken])
