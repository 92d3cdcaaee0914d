"""The merge claim on the hard toy (issue 12, item 4), checked on a merge stage's metrics document.

The LCM-LoRA report's Section 3.2 claim, as issue 12 states it for the hard toy: the 4-step merged
variant at (l1 style, l2 LCM) = (0.8, 1.0) keeps >= 80% of the style strength of the style LoRA
alone at 25 DPM-Solver++ steps, with adherence >= 0.8 x that reference's. The rows are the merge
stage's (`components/evaluate/merge_eval.py`): "style-alone dpmpp-25" (the reference) and
"merged LoRA (0.8, 1)". One more check keeps the claim from passing vacuously: the reference
itself shows the style (strength >= 0.5 on the plain 0 / styled 1 scale); a style LoRA that drew
plain scenes would make any merged row "keep 80%" of nothing.
"""

from __future__ import annotations

from typing import Any

from components.evaluate.gate import GateResult, Rule, check_rules

CLAIM_WEIGHTS = (0.8, 1.0)  # (l1 style, l2 LCM)
MIN_STYLE_RETENTION = 0.8  # merged style strength / the reference's
MIN_ADHERENCE_RATIO = 0.8  # merged adherence / the reference's
MIN_REFERENCE_STRENGTH = 0.5  # the reference must show the style at all
# issue 28: the style-dedicated variant (an LCM-LoRA distilled for the style model on its own samples)
VARIANT_MIN_STYLE_RETENTION = 0.8  # its style strength at 4 steps / the reference's
VARIANT_MIN_ADHERENCE_RATIO = 0.95  # its adherence / the reference's
VARIANT_MAX_COST_RATIO = 1.5  # synthesize + distill seconds / the base's own distillation's


def reference_label(reference_steps: int = 25) -> str:
    return f"style-alone dpmpp-{reference_steps}"


def merged_label(l1: float = CLAIM_WEIGHTS[0], l2: float = CLAIM_WEIGHTS[1]) -> str:
    return f"merged LoRA ({l1:g}, {l2:g})"


def claim_rules(reference_steps: int = 25) -> list[Rule]:
    """The claim as gate rules over the merge rows (keyed by label)."""
    ref, merged = reference_label(reference_steps), merged_label()
    return [
        Rule("claim merged_style_ge_0.8x_reference", "style_strength", merged, (ref,), MIN_STYLE_RETENTION),
        Rule("claim merged_adherence_ge_0.8x_reference", "adherence", merged, (ref,), MIN_ADHERENCE_RATIO),
        Rule("claim reference_shows_style", "style_strength", ref, constant=MIN_REFERENCE_STRENGTH),
    ]


def check_merge_claim(doc: dict[str, Any]) -> GateResult:
    """The claim against a merge metrics document (metrics.json of the merge stage); missing rows fail."""
    steps = int(doc.get("config", {}).get("reference_steps", 25))
    if steps != 25 or int(doc.get("config", {}).get("lcm_steps", 4)) != 4:
        raise ValueError(f"merge claim: needs merge.reference_steps=25 and merge.lcm_steps=4, the run had "
                         f"{steps} and {doc['config'].get('lcm_steps')}; rerun the merge with those")
    rows = {row["label"]: row for row in doc["rows"]}
    return check_rules(claim_rules(steps), rows)


def variant_rules(variant_label: str, reference_steps: int = 25) -> list[Rule]:
    """Issue 28's goals for the style-dedicated variant, over the merge rows plus the variant's row."""
    ref = reference_label(reference_steps)
    return [
        Rule("goal variant_style_ge_0.8x_reference", "style_strength", variant_label, (ref,),
             VARIANT_MIN_STYLE_RETENTION),
        Rule("goal variant_adherence_ge_0.95x_reference", "adherence", variant_label, (ref,),
             VARIANT_MIN_ADHERENCE_RATIO),
    ]


def check_style_variant(merge_doc: dict[str, Any], variant_row: dict[str, Any], variant_seconds: dict[str, float],
                        base_distill_seconds: float | None) -> GateResult:
    """The variant's goals: style and adherence against the merge's reference row, and (when the base's own
    distillation time is known) the cost of synthesizing and distilling it against that time."""
    rows = {row["label"]: row for row in merge_doc["rows"]}
    rows[variant_row["label"]] = variant_row
    result = check_rules(variant_rules(variant_row["label"], int(merge_doc["config"].get("reference_steps", 25))),
                         rows)
    if base_distill_seconds is None:
        return result
    cost = variant_seconds.get("synthesize", 0.0) + variant_seconds.get("distill", 0.0)
    bound = VARIANT_MAX_COST_RATIO * base_distill_seconds
    check = {"key": "goal variant_cost_le_1.5x_base_distill", "rule": "synthesize + distill seconds <= 1.5 x "
             "the base's distill seconds", "value": round(cost, 1), "bound": round(bound, 1), "passed": cost <= bound}
    violations = list(result.violations) + ([] if check["passed"] else [
        f"{check['key']}: {check['rule']}: {cost:.1f} > {bound:.1f}"])
    return GateResult(not violations, violations, [*result.checks, check], list(result.skipped))
