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
