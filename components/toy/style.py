"""The toy style set on disk: sklearn's digits drawn with `render_digit_styled`.

Layout of the folder (simple and loader-free): `NNNNN.png` (32x32 RGB) and `NNNNN.txt`
(the plain caption, "a handwritten digit seven") per sample, plus `metadata.jsonl` with one
`{"key", "file", "caption", "label", "source_index"}` row per sample. Deterministic for a seed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from components.toy.render import caption_for, render_digit_styled


def toy_style_rows(count: int, seed: int = 0) -> list[dict]:
    """Which digits the style set holds: `count` rows drawn without replacement (with it past 1,797)."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(labels), size=count, replace=count > len(labels))
    return [{"key": f"{i:05d}", "label": int(labels[j]), "source_index": int(j), "caption": caption_for(labels[j])}
            for i, j in enumerate(pick)]


def write_toy_style(folder: str | Path, count: int = 500, seed: int = 0) -> Path:
    """Write `count` toy-style images with captions and metadata.jsonl into `folder`; returns it."""
    from sklearn.datasets import load_digits

    if count < 1:
        raise ValueError(f"toy.style_count must be >= 1, got {count}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = load_digits().images
    rng = np.random.default_rng(seed + 1)
    rows = toy_style_rows(count, seed)
    return write_style_set(folder, rows, (render_digit_styled(images[row["source_index"]], rng) for row in rows))


def write_style_set(folder: Path, rows: list[dict], images: Iterable[Image.Image]) -> Path:
    """Each row's image as `KEY.png` and its caption as `KEY.txt`, then every row (with its `file`) in
    `metadata.jsonl`, into `folder`; `images` are drawn one per row, in order."""
    for row, image in zip(rows, images, strict=True):
        image.save(folder / f"{row['key']}.png")
        (folder / f"{row['key']}.txt").write_text(row["caption"] + "\n")
        row["file"] = f"{row['key']}.png"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return folder
