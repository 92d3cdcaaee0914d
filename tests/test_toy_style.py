"""The toy style set on disk: layout, captions, determinism."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from components.toy.render import caption_for
from components.toy.style import write_toy_style


def test_style_set_layout_and_determinism(tmp_path):
    a = write_toy_style(tmp_path / "a", count=12, seed=3)
    b = write_toy_style(tmp_path / "b", count=12, seed=3)
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        image = Image.open(a / row["file"])
        assert image.size == (32, 32) and image.mode == "RGB"
        assert (a / f"{row['key']}.txt").read_text().strip() == row["caption"] == caption_for(row["label"])
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(b / row["file"])))
    assert np.asarray(Image.open(a / rows[0]["file"])).mean() < 120  # dark style, not the light plain rendering
