"""Floats the CLI prints are rounded (issue 16 item 15): the merge rule's violations, which
`lcmlora merge` prints when no (l1, l2) passes, carry 3-4 significant digits."""

from __future__ import annotations

import re

from components.config import MergeConfig
from components.evaluate.merge_eval import select_best

LONG_FLOAT = re.compile(r"\d+\.\d{5,}")  # a float with more than 4 decimals


def test_merge_rule_violations_print_rounded_floats():
    row = {"label": "merged LoRA (1, 1)", "variant": "merged", "l1": 1.0, "l2": 1.0,
           "style_retention": 0.9800829887390137, "adherence": 0.12345678901, "fd": 1.0}
    best, violations = select_best([row], MergeConfig(min_style_retention=0.99, min_adherence=0.5))
    assert best is None and len(violations) == 2
    text = "; ".join(violations)
    assert not LONG_FLOAT.search(text), text
    assert "style retention 0.980 < merge.min_style_retention 0.99" in text
    assert "adherence 0.123 < merge.min_adherence 0.5" in text
