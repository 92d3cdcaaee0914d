"""The hard toy source: two-digit colour scenes in LAION/img2dataset format, with defects.

Same layout, columns, defects and determinism as the easy toy source, written by the same
`write_laion_source` (`components/toy/source.py`); only what is drawn differs: images are 64x64
scenes captioned compositionally, and clean images come at varied *original sizes* (shorter
side 64-128 px, aspect up to 1.5, the extra paper on the right or bottom), so SDXL-family training has real `original_size` and `crop_top_left`
micro-conditioning to learn: a crop from (0, 0) shows the whole scene, other crops cut it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from components.config import Params
from components.toy.hard.config import hard_toy_config
from components.toy.hard.render import (
    caption_for,
    random_look,
    random_scene,
    render_scene,
)
from components.toy.source import (
    MISSHAPEN,
    SHARD_SIZE,
    PlannedRow,
    SourceDraw,
    misshapen,
    plan_rows,
    write_laion_source,
)

URL_PREFIX = "https://toy.lcmlora.invalid/hard"
SHORT_SIDES = (64, 80, 96, 128)  # shorter side of clean originals
ASPECTS = (1.0, 1.0, 1.25, 1.5)  # long/short ratios of clean originals (square half the time)


def original_canvas(scene_image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The scene at a varied original size: scaled to a random shorter side, paper added right or bottom."""
    short = int(rng.choice(SHORT_SIDES))
    long = round(short * float(rng.choice(ASPECTS)))
    scaled = scene_image.resize((short, short), Image.Resampling.BICUBIC)
    size = (long, short) if rng.random() < 0.5 else (short, long)
    canvas = Image.new("RGB", size, scene_image.getpixel((0, 0)))
    canvas.paste(scaled, (0, 0))
    return canvas


def _image_for(defect: str | None, scene_image: Image.Image, rng: np.random.Generator) -> Image.Image:
    if defect in MISSHAPEN:
        return misshapen(defect, scene_image)
    return original_canvas(scene_image, rng)


def write_hard_source(output: str | Path, rows: int = 2000, seed: int = 0,
                      shard_size: int = SHARD_SIZE, look_fraction: float = 0.0, layout: str = "narrow",
                      look: Callable[[np.random.Generator], np.ndarray] = random_look) -> dict[str, Any]:
    """Write `rows` scenes (plus duplicates) to `output`; returns the summary (also `toy_summary.json`).

    `look_fraction` of the images are drawn on other papers (`look`, by default `render.random_look`,
    from their own generator: with 0 the source is the same bytes as without it); the summary counts
    them. Digits sit as `layout` places them (render.py:render_scene)."""
    if not 0.0 <= look_fraction <= 1.0:
        raise ValueError(f"toy.hard.look_fraction must be in [0, 1], got {look_fraction}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    plan = plan_rows(rows, rng)
    scenes = [random_scene(digits.target, rng) for _ in range(rows)]
    look_rng = np.random.default_rng([seed, 23])
    looks: list[bool] = []  # per drawn image: on another paper

    def image(row: PlannedRow, rng: np.random.Generator) -> Image.Image:
        scene, i, j, _ = scenes[row.digit]
        background = look(look_rng) if look_fraction and look_rng.random() < look_fraction else None
        looks.append(background is not None)
        scene_image = render_scene(digits.images[i], digits.images[j], scene, rng, background=background, layout=layout)
        return _image_for(row.defect, scene_image, rng)

    def caption(row: PlannedRow) -> str:
        scene, _, _, right_first = scenes[row.digit]
        return caption_for(scene, right_first)

    def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"scenes": rows, "look_fraction": look_fraction, "other_looks": sum(looks), "layout": layout,
                "sizes": sorted({f"{r['WIDTH']}x{r['HEIGHT']}" for r in records if r["_defect"] is None})}

    draw = SourceDraw(image=image, caption=caption, url=lambda row: f"{URL_PREFIX}/{row.digit:05d}.png",
                      summary=summary)
    return write_laion_source(output, plan, draw, rng, seed, shard_size)


def write_source(folder: Path, params: Params) -> dict[str, Any]:
    """The hard source (toy.hard.source_rows scenes, seed, look_fraction, layout) written to `folder`."""
    hard = hard_toy_config(params)
    return write_hard_source(folder, rows=hard.source_rows, seed=hard.seed, look_fraction=hard.look_fraction,
                             layout=hard.layout)


def source_settings(params: Params) -> dict[str, tuple[object, object]]:
    """What an existing hard source's toy_summary.json must say: seed, scenes, look fraction and layout (a
    summary from before `look_fraction` or `layout` existed is a plain, narrow source)."""
    hard = hard_toy_config(params)
    return {"seed": (hard.seed, None), "scenes": (hard.source_rows, None), "look_fraction": (hard.look_fraction, 0.0),
            "layout": (hard.layout, "narrow")}
