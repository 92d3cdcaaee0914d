"""The evaluation gate: each threshold failing alone, all listed together, failing closed."""

from __future__ import annotations

import math

import pytest

from components.config import EvaluateConfig
from components.evaluate.gate import Rule, check_rules, evaluate_gate

CFG = EvaluateConfig(lcm1_psnr_min=20.0, lcm2_adherence_min_ratio=0.8, lcm2_psnr_min=21.0)  # every threshold on:
# 1.3x teacher-50 FD, below DPM-4, 0.9 adherence (lcm-4), 0.8 adherence (lcm-2), PSNR of lcm-1 and lcm-2


def passing_rows() -> dict[str, dict[str, float]]:
    return {
        "lcm-1": {"fd": 0.5, "adherence": 0.90, "psnr": 22.0},
        "lcm-2": {"fd": 0.35, "adherence": 0.90, "psnr": 21.5},
        "lcm-4": {"fd": 0.25, "adherence": 0.95},
        "ddim-50": {"fd": 0.22, "adherence": 0.97},
        "dpmpp-50": {"fd": 0.20, "adherence": 1.00},
        "dpmpp-4": {"fd": 0.30, "adherence": 0.96},
    }


def test_passing_rows_pass_with_every_check_recorded():
    result = evaluate_gate(passing_rows(), CFG)
    assert result.passed and result.violations == []
    assert [c["key"] for c in result.checks] == [
        "evaluate.lcm4_fd_max_ratio_to_teacher50", "evaluate.lcm4_fd_below_dpm4",
        "evaluate.adherence_min_ratio", "evaluate.lcm2_adherence_min_ratio", "evaluate.lcm1_psnr_min",
        "evaluate.lcm2_psnr_min"]
    fd_check = result.checks[0]
    assert fd_check["bound"] == pytest.approx(1.3 * 0.20) and fd_check["value"] == 0.25  # best teacher-50 is dpmpp


@pytest.mark.parametrize("key, label, metric, value", [
    ("evaluate.lcm4_fd_max_ratio_to_teacher50", "ddim-50", "fd", 0.10),  # 1.3 x 0.10 < 0.25
    ("evaluate.lcm4_fd_below_dpm4", "dpmpp-4", "fd", 0.24),
    ("evaluate.adherence_min_ratio", "dpmpp-50", "adherence", 1.10),  # 0.9 x 1.10 = 0.99 > 0.95 (lcm-2: 0.88 <= 0.9)
    ("evaluate.lcm2_adherence_min_ratio", "lcm-2", "adherence", 0.79),  # 0.8 x 1.0 = 0.8 > 0.79
    ("evaluate.lcm1_psnr_min", "lcm-1", "psnr", 19.0),
    ("evaluate.lcm2_psnr_min", "lcm-2", "psnr", 20.9),
])
def test_each_threshold_fails_alone(key, label, metric, value):
    rows = passing_rows()
    rows[label][metric] = value
    result = evaluate_gate(rows, CFG)
    assert not result.passed
    assert len(result.violations) == 1 and result.violations[0].startswith(key + ":")


def test_all_violations_are_listed_together():
    rows = passing_rows()
    rows["lcm-4"].update(fd=1.0, adherence=0.1)
    rows["lcm-2"]["adherence"] = 0.1
    rows["lcm-1"]["psnr"] = 5.0
    rows["lcm-2"]["psnr"] = 5.0
    result = evaluate_gate(rows, CFG)
    assert not result.passed
    assert [v.split(":")[0] for v in result.violations] == [
        "evaluate.lcm4_fd_max_ratio_to_teacher50", "evaluate.lcm4_fd_below_dpm4",
        "evaluate.adherence_min_ratio", "evaluate.lcm2_adherence_min_ratio", "evaluate.lcm1_psnr_min",
        "evaluate.lcm2_psnr_min"]
    assert "lcm-4 fd 1 exceeds 1.3 x dpmpp-50 0.2 = 0.26" in result.violations[0]


@pytest.mark.parametrize("broken", ["missing_row", "missing_metric", "nan", "none"])
def test_missing_or_non_finite_metrics_fail_closed(broken):
    rows = passing_rows()
    if broken == "missing_row":
        del rows["dpmpp-4"]
    elif broken == "missing_metric":
        del rows["dpmpp-4"]["fd"]
    else:
        rows["dpmpp-4"]["fd"] = math.nan if broken == "nan" else None
    result = evaluate_gate(rows, CFG)
    assert not result.passed
    assert result.violations == [
        "evaluate.lcm4_fd_below_dpm4: cannot check lcm-4 fd <= dpmpp-4: fd missing for dpmpp-4 (the gate fails closed)"]


def test_missing_subject_fails_closed():
    rows = passing_rows()
    del rows["lcm-4"]
    result = evaluate_gate(rows, CFG)
    assert len(result.violations) == 3 and all("missing for lcm-4" in v for v in result.violations)


def test_switched_off_thresholds_are_skipped_not_passed():
    cfg = EvaluateConfig(lcm4_fd_below_dpm4=False, lcm1_psnr_min=None)
    result = evaluate_gate(passing_rows(), cfg)
    assert result.passed
    assert result.skipped == ["evaluate.lcm4_fd_below_dpm4", "evaluate.lcm2_adherence_min_ratio", "evaluate.lcm1_psnr_min",
                              "evaluate.lcm2_psnr_min"]
    assert result.to_dict()["skipped"] == result.skipped


def test_a_gate_with_every_threshold_off_fails():
    cfg = EvaluateConfig(lcm4_fd_max_ratio_to_teacher50=None, lcm4_fd_below_dpm4=False, adherence_min_ratio=None)
    result = evaluate_gate(passing_rows(), cfg)
    assert not result.passed and "every gate threshold is switched off" in result.violations[0]


def test_rules_with_a_constant_and_higher_is_better():
    rows = {"lcm-1": {"adherence": 0.85, "fd": 0.4}, "ddim-1": {"fd": 1.0}}
    result = check_rules([Rule("goal.lcm1_accuracy", "adherence", "lcm-1", constant=0.9),
                          Rule("goal.lcm1_fd_half_ddim1", "fd", "lcm-1", ("ddim-1",), 0.5)], rows)
    assert result.violations == ["goal.lcm1_accuracy: lcm-1 adherence 0.85 falls below 0.9"]


def test_gate_teacher_steps_moves_both_ratio_thresholds_to_other_teacher_rows():
    rows = passing_rows()
    rows["ddim-25"], rows["dpmpp-25"] = {"fd": 0.10, "adherence": 1.0}, {"fd": 0.12, "adherence": 0.99}
    cfg = EvaluateConfig(gate_teacher_steps=25, lcm1_psnr_min=None)
    result = evaluate_gate(rows, cfg)  # lcm-4 FD 0.25 > 1.3 x ddim-25 0.10; adherence 0.95 >= 0.9 x 1.0
    assert not result.passed and len(result.violations) == 1
    assert "ddim-25 0.1" in result.violations[0] and "ddim-50" not in result.violations[0]
    assert {c["rule"] for c in result.checks} >= {"lcm-4 fd <= 1.3 x best of ddim-25 / dpmpp-25",
                                                 "lcm-4 adherence >= 0.9 x best of ddim-25 / dpmpp-25"}
    del rows["dpmpp-25"]  # a missing reference row fails closed, not back to the 50-step rows
    assert "dpmpp-25" in " ".join(evaluate_gate(rows, cfg).violations)


def test_a_pcm_lora_is_gated_on_its_own_rows():
    from components.config import EvaluateConfig
    from components.evaluate.gate import gate_rules

    rules, _ = gate_rules(EvaluateConfig(lcm2_adherence_min_ratio=0.9, lcm1_psnr_min=10.0), student="pcm")
    assert {r.subject for r in rules} == {"pcm-4", "pcm-2", "pcm-1"}
    assert {r.subject for r in gate_rules(EvaluateConfig())[0]} == {"lcm-4"}


def test_cfg_rows_need_negative_prompts():
    from components.config import EvaluateConfig

    with pytest.raises(ValueError, match="negative_prompts"):
        EvaluateConfig(cfg_scales=[3.0])
    assert EvaluateConfig(cfg_scales=[3.0], negative_prompts="neg.txt").cfg_steps == [4]


def test_a_rule_written_for_an_lcm_lora_reads_a_pcm_loras_own_rows():
    from components.evaluate.gate import for_student

    rule = Rule("goal lcm8_fd_le_1.1x_lcm4", "fd", "lcm-8", ("lcm-4", "lcm_base-4", "ddim-4"), 1.1)
    assert for_student(rule, "lcm") is rule
    moved = for_student(rule, "pcm")
    assert (moved.subject, moved.references) == ("pcm-8", ("pcm-4", "lcm_base-4", "ddim-4"))
    rows = {"pcm-8": {"fd": 1.0}, "pcm-4": {"fd": 1.0}, "lcm_base-4": {"fd": 5.0}, "ddim-4": {"fd": 5.0}}
    assert check_rules([moved], rows).passed and not check_rules([rule], rows).passed


def test_a_pcm_lora_has_its_own_2_step_psnr_bound_where_one_is_set():
    from components.evaluate.gate import gate_rules

    cfg = EvaluateConfig(lcm2_psnr_min=21.0, pcm2_psnr_min=23.5)
    psnr = {r.key: (r.subject, r.constant) for r in gate_rules(cfg, student="pcm")[0] if r.metric == "psnr"}
    assert psnr == {"evaluate.pcm2_psnr_min": ("pcm-2", 23.5)}
    lcm = {r.key: (r.subject, r.constant) for r in gate_rules(cfg)[0] if r.metric == "psnr"}
    assert lcm == {"evaluate.lcm2_psnr_min": ("lcm-2", 21.0)}  # an LCM-LoRA keeps its own
    assert {r.key for r in gate_rules(EvaluateConfig(lcm2_psnr_min=21.0), student="pcm")[0]
            if r.metric == "psnr"} == {"evaluate.lcm2_psnr_min"}  # unset: lcm2_psnr_min judges pcm-2
    # the hard toy's 10-step PCM-LoRA (session 16) passed lcm2_psnr_min at 21.86 dB; PCM's own bound fails it
    rows = {"pcm-2": {"fd": 417.3, "adherence": 0.84, "psnr": 21.864}, "pcm-4": {"fd": 274.3, "adherence": 0.89},
            "ddim-25": {"fd": 527.4, "adherence": 1.0}, "dpmpp-25": {"fd": 509.9, "adherence": 1.0}}
    hard = {"gate_teacher_steps": 25, "lcm4_fd_max_ratio_to_teacher50": 1.2, "adherence_min_ratio": 0.8,
            "lcm4_fd_below_dpm4": False, "lcm2_adherence_min_ratio": 0.75, "lcm2_psnr_min": 21.0}
    assert evaluate_gate(rows, EvaluateConfig(**hard), student="pcm").passed
    failed = evaluate_gate(rows, EvaluateConfig(**hard, pcm2_psnr_min=23.5), student="pcm")
    assert not failed.passed and failed.violations == ["evaluate.pcm2_psnr_min: pcm-2 psnr 21.86 falls below 23.5"]
