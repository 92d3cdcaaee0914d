"""The evaluation gate: thresholds from params, every one checked, every violation listed.

A rule says that one method's metric must be no worse than a bound: a constant, or a factor
times the best value among reference methods ("best" is the lowest FD, the highest adherence,
PSNR or SSIM). The gate fails closed: a metric that is missing or not finite is a violation,
never a pass. A threshold switched off in params (None / false) is listed as skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from components.config import EvaluateConfig

LOWER_IS_BETTER = {"fd": True, "adherence": False, "psnr": False, "ssim": False, "style_strength": False}
Rows = dict[str, dict[str, Any]]  # method label ("lcm-4") -> metric name -> value


@dataclass(frozen=True)
class Rule:
    key: str  # the params key (or goal name) the rule comes from, quoted in its violation
    metric: str  # fd | adherence | psnr | ssim | style_strength
    subject: str  # method label, e.g. "lcm-4"
    references: tuple[str, ...] = ()  # method labels whose best value, times factor, is the bound
    factor: float = 1.0
    constant: float | None = None  # an absolute bound instead of references

    def describe(self) -> str:
        word = "<=" if LOWER_IS_BETTER[self.metric] else ">="
        if self.constant is not None:
            return f"{self.subject} {self.metric} {word} {self.constant:g}"
        refs = " / ".join(self.references)
        scale = "" if self.factor == 1.0 else f"{self.factor:g} x "
        best = "best of " if len(self.references) > 1 else ""
        return f"{self.subject} {self.metric} {word} {scale}{best}{refs}"


@dataclass(frozen=True)
class GateResult:
    passed: bool
    violations: list[str]  # one sentence each
    checks: list[dict[str, Any]] = field(default_factory=list)  # every rule with its values and outcome
    skipped: list[str] = field(default_factory=list)  # thresholds switched off in params

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "violations": list(self.violations), "checks": list(self.checks),
                "skipped": list(self.skipped)}


def for_student(rule: Rule, student: str) -> Rule:
    """`rule` with its LCM-LoRA rows (`lcm-N`, `lcm-N-cfgG`) read as the student's (`pcm-N`): a rule written
    for an LCM-LoRA judges a PCM-LoRA's own rows; teacher and `lcm_base-N` rows are left as they are."""
    def relabel(label: str) -> str:
        return f"{student}-{label[4:]}" if label.startswith("lcm-") else label

    if student == "lcm":
        return rule
    return replace(rule, subject=relabel(rule.subject), references=tuple(relabel(r) for r in rule.references))


def metric_value(rows: Rows, label: str, metric: str) -> float | None:
    """rows[label][metric] as a float, or None when missing or not finite."""
    value = rows.get(label, {}).get(metric)
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_rule(rule: Rule, rows: Rows) -> tuple[bool, str, dict[str, Any]]:
    """(passed, sentence, record) for one rule; missing values fail."""
    lower = LOWER_IS_BETTER[rule.metric]
    record: dict[str, Any] = {"key": rule.key, "rule": rule.describe()}
    subject = metric_value(rows, rule.subject, rule.metric)
    record["value"] = subject
    if rule.constant is not None:
        bound, bound_text = rule.constant, f"{rule.constant:g}"
    else:
        found = {ref: metric_value(rows, ref, rule.metric) for ref in rule.references}
        missing = [ref for ref, v in found.items() if v is None]
        if missing or not found:
            record.update(bound=None, passed=False)
            what = ", ".join(missing) or "no reference method"
            return False, (f"{rule.key}: cannot check {rule.describe()}: {rule.metric} missing for {what} "
                           "(the gate fails closed)"), record
        best_ref = (min if lower else max)(found, key=found.__getitem__)
        bound = rule.factor * found[best_ref]
        bound_text = (f"{rule.factor:g} x {best_ref} {found[best_ref]:.4g} = {bound:.4g}" if rule.factor != 1.0
                      else f"{best_ref} {found[best_ref]:.4g}")
    record["bound"] = bound
    if subject is None:
        record["passed"] = False
        return False, (f"{rule.key}: cannot check {rule.describe()}: {rule.metric} missing for {rule.subject} "
                       "(the gate fails closed)"), record
    passed = subject <= bound if lower else subject >= bound
    record["passed"] = passed
    verb = "exceeds" if lower else "falls below"
    return passed, f"{rule.key}: {rule.subject} {rule.metric} {subject:.4g} {verb} {bound_text}", record


def check_rules(rules: list[Rule], rows: Rows, skipped: list[str] | None = None) -> GateResult:
    """Check every rule; the result lists every violation at once."""
    violations, checks = [], []
    for rule in rules:
        passed, sentence, record = check_rule(rule, rows)
        checks.append(record)
        if not passed:
            violations.append(sentence)
    return GateResult(passed=not violations, violations=violations, checks=checks, skipped=list(skipped or []))


def gate_rules(cfg: EvaluateConfig, student: str = "lcm") -> tuple[list[Rule], list[str]]:
    """(rules, skipped keys) from the evaluate section's thresholds. `student`: the sampler of the
    LoRA's own rows (`lcm`, or `pcm` for a PCM-LoRA); the `lcm4_*` / `lcm2_*` keys judge its 4- and
    2-step rows either way (`for_student`), except that `pcm2_psnr_min`, where set, replaces
    `lcm2_psnr_min` for a PCM-LoRA."""
    # "teacher50" in the two ratio keys: the teacher at gate_teacher_steps (50 unless set); the
    # rule's record and violation name the rows it compared against
    teacher50 = tuple(f"{s}-{cfg.gate_teacher_steps}" for s in cfg.teacher_samplers)
    rules, skipped = [], []
    if cfg.lcm4_fd_max_ratio_to_teacher50 is not None:
        rules.append(Rule("evaluate.lcm4_fd_max_ratio_to_teacher50", "fd", "lcm-4", teacher50,
                          cfg.lcm4_fd_max_ratio_to_teacher50))
    else:
        skipped.append("evaluate.lcm4_fd_max_ratio_to_teacher50")
    if cfg.lcm4_fd_below_dpm4:
        rules.append(Rule("evaluate.lcm4_fd_below_dpm4", "fd", "lcm-4", ("dpmpp-4",)))
    else:
        skipped.append("evaluate.lcm4_fd_below_dpm4")
    if cfg.adherence_min_ratio is not None:
        rules.append(Rule("evaluate.adherence_min_ratio", "adherence", "lcm-4", teacher50, cfg.adherence_min_ratio))
    else:
        skipped.append("evaluate.adherence_min_ratio")
    if cfg.lcm2_adherence_min_ratio is not None:
        rules.append(Rule("evaluate.lcm2_adherence_min_ratio", "adherence", "lcm-2", teacher50,
                          cfg.lcm2_adherence_min_ratio))
    else:
        skipped.append("evaluate.lcm2_adherence_min_ratio")
    for steps, bound in ((1, cfg.lcm1_psnr_min), (2, cfg.lcm2_psnr_min)):
        key = f"evaluate.lcm{steps}_psnr_min"
        if steps == 2 and student == "pcm" and cfg.pcm2_psnr_min is not None:  # PCM's own bound
            key, bound = "evaluate.pcm2_psnr_min", cfg.pcm2_psnr_min
        if bound is not None:
            rules.append(Rule(key, "psnr", f"lcm-{steps}", constant=bound))
        else:
            skipped.append(key)
    return [for_student(rule, student) for rule in rules], skipped


def evaluate_gate(rows: Rows, cfg: EvaluateConfig, student: str = "lcm") -> GateResult:
    """The gate of `lcmlora evaluate`: every threshold in `cfg` against the metric rows (`student`:
    the LoRA's own sampler rows, see `gate_rules`)."""
    rules, skipped = gate_rules(cfg, student)
    result = check_rules(rules, rows, skipped)
    if not rules:  # a gate that checks nothing must not pass
        return GateResult(False, ["evaluate: every gate threshold is switched off; enable at least one"],
                          result.checks, result.skipped)
    return result
