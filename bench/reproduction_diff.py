"""Compare the method tables of two toy reproductions (`reproduction.json`), timings aside.

    python bench/reproduction_diff.py RUN_A/sd15/reproduction.json RUN_B/sd15/reproduction.json

A refactor must leave every figure of a fixed-seed reproduction as it was: prints each row that
differs (metric, both values) and exits 1 if any does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TIMINGS = {"seconds_per_image"}  # wall-clock figures: they differ run to run


def rows(path: str) -> dict[str, dict]:
    """label -> the method's figures, timings left out."""
    methods = json.loads(Path(path).read_text())["evaluation"]["methods"]
    return {m["label"]: {k: v for k, v in m.items() if k not in TIMINGS} for m in methods}


def main(a: str, b: str) -> int:
    x, y = rows(a), rows(b)
    differing = [label for label in sorted(set(x) | set(y)) if x.get(label) != y.get(label)]
    for label in differing:
        old, new = x.get(label, {}), y.get(label, {})
        print(label, {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)})
    print(f"{len(x)} rows, {len(differing)} differ")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
