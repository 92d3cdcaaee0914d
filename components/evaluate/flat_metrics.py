"""`metrics_flat.json`: the quality figures of an evaluation or a merge as flat scalars for DVC.

`dvc metrics show` / `diff` drop numbers that sit in lists (the method rows of metrics.json), so
each stage also writes one flat object of numbers beside its metrics.json (dvc.yaml `metrics:`):

    {"lcm-4.fd": 273.96, "lcm-4.adherence": 0.975, "lcm-1.psnr": 22.07, ..., "gate.passed": 1}   evaluate
    {"merge.fd": 41.2, "merge.adherence": 0.9, "merge.style_retention": 0.93, "merge.gate.passed": 1}   merge
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FLAT_METRICS_NAME = "metrics_flat.json"
EVALUATION_METRICS = ("fd", "adherence", "psnr", "ssim", "seconds_per_image")  # per method row
MERGE_METRICS = ("fd", "adherence", "style_strength", "style_retention", "psnr", "ssim")  # of the selected variant


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return round(float(value), 6)


def evaluation_scalars(doc: dict[str, Any]) -> dict[str, float | int]:
    """`LABEL.METRIC` for every method row of an evaluation's metrics.json, and `gate.passed` (0/1)."""
    flat: dict[str, float | int] = {}
    for row in doc.get("methods", []):
        for metric in EVALUATION_METRICS:
            value = _number(row.get(metric))
            if value is not None:
                flat[f"{row['label']}.{metric}"] = value
    flat["gate.passed"] = int(bool(doc.get("gate", {}).get("passed")))
    return flat


def merge_scalars(doc: dict[str, Any]) -> dict[str, float | int]:
    """`merge.METRIC` of the variant the merge rule selected (none: only the gate), and `merge.gate.passed`."""
    selection = doc.get("selection", {})
    best = selection.get("best")
    flat: dict[str, float | int] = {}
    row = next((r for r in doc.get("rows", []) if best and r.get("label") == best.get("label")), None)
    for metric in MERGE_METRICS:
        value = _number((row or {}).get(metric))
        if value is not None:
            flat[f"merge.{metric}"] = value
    if best:
        flat["merge.l1"], flat["merge.l2"] = float(best["l1"]), float(best["l2"])
    flat["merge.gate.passed"] = int(bool(selection.get("passed")))
    return flat


def write_flat_metrics(folder: str | Path, scalars: dict[str, float | int]) -> Path:
    """Write `metrics_flat.json` (sorted keys) into `folder`."""
    path = Path(folder) / FLAT_METRICS_NAME
    path.write_text(json.dumps(scalars, indent=1, sort_keys=True) + "\n")
    return path
