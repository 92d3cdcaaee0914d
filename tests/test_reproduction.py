"""The toy reproduction: its goals on known rows, and (short version) the direction of the claim
on the real toy base: after a brief distillation, LCM at 2 steps beats teacher DDIM at 2 steps on FD."""

from __future__ import annotations

from components.reproduction import TOY_GOALS, check_goals, goals_markdown


def rows_doc(**overrides) -> dict:
    rows = {"lcm-1": {"fd": 0.40, "adherence": 0.95}, "lcm-2": {"fd": 0.15, "adherence": 0.97},
            "lcm-4": {"fd": 0.16, "adherence": 0.97}, "ddim-1": {"fd": 0.90, "adherence": 0.5},
            "ddim-4": {"fd": 0.20, "adherence": 0.96}, "dpmpp-4": {"fd": 0.21, "adherence": 0.96},
            "ddim-50": {"fd": 0.15, "adherence": 0.98}, "dpmpp-50": {"fd": 0.16, "adherence": 0.99}}
    for key, value in overrides.items():
        label, metric = key.rsplit("_", 1)
        rows[label.replace("_", "-")][metric] = value
    return {"methods": [{"label": k, **v} for k, v in rows.items()]}


def test_goals_met_on_rows_that_reproduce_the_claim():
    goals = check_goals(rows_doc())
    assert goals.passed and len(goals.checks) == len(TOY_GOALS)
    assert "**met**" in goals_markdown(goals) and "NOT met" not in goals_markdown(goals)


def test_each_goal_can_fail_and_all_failures_are_listed():
    goals = check_goals(rows_doc(lcm_2_fd=0.25, lcm_4_fd=0.5, lcm_4_adherence=0.5, lcm_1_adherence=0.8, lcm_1_fd=0.6))
    assert [v.split(":")[0] for v in goals.violations] == [rule.key for rule in TOY_GOALS]
    assert goals_markdown(goals).count("NOT met") == len(TOY_GOALS)


def test_a_missing_row_fails_its_goals():
    doc = rows_doc()
    doc["methods"] = [m for m in doc["methods"] if m["label"] != "ddim-1"]
    goals = check_goals(doc)
    assert goals.violations == [("goal lcm1_fd_le_half_ddim1: cannot check lcm-1 fd <= 0.5 x ddim-1: "
                                "fd missing for ddim-1 (the gate fails closed)")]
