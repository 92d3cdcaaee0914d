"""Max abs difference over every tensor of two LoRA files (or folders): 0.0 means the same LoRA.

    python bench/lora_diff.py REGISTRY_A/NAME/versions/1 REGISTRY_B/NAME/versions/1

Prints one line per file pair (diffusers and kohya files of a contract-4 folder) and exits 1 when
the tensor names differ or any difference is not 0.0.
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import load_file

FILES = ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors")


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest |a - b| over every tensor; inf when the two files hold other tensor names or shapes."""
    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys() or any(x[k].shape != y[k].shape for k in x):
        return float("inf")
    return max(((x[k].float() - y[k].float()).abs().max().item() for k in x), default=0.0)


def main(argv: list[str]) -> int:
    a, b = Path(argv[0]), Path(argv[1])
    pairs = [(a / f, b / f) for f in FILES if (a / f).is_file() or (b / f).is_file()] if a.is_dir() else [(a, b)]
    worst = 0.0
    for x, y in pairs:
        diff = max_abs_diff(x, y) if x.is_file() and y.is_file() else float("inf")
        worst = max(worst, diff)
        print(f"{x.name}: max abs diff {diff}")
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
