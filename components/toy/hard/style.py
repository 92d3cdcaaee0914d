"""The hard toy styles: the same two-digit scenes on another paper and ink, and their style sets.

Two styles, so that a claim about style LoRAs is not a property of one look (issue 28):

- `blue-ruled` (the default, the merge claim's since session 6): cool blue paper with diagonal
  stripes 4 pixels wide and a 2-pixel dark blue frame, the ink as on plain paper.
- `sepia-grid`: warm sepia paper with a brown graph grid (a 1-pixel line every 8 pixels both
  ways) and washed ink (opacity 0.9: the paper shows through the strokes).

`render_scene_styled` draws a scene exactly as `render.py:render_scene` does (same digits, inks,
positions and jitter, the same random draws) on the style's paper with its ink. The hard judges
still read all four parts of both (tests/test_toy_hard_style.py; darker papers are not read: the
judges learned light paper only). A base's VAE shows only the styles its decoder was tuned on
(`toy.hard.decoder_styles`, `vae_training_images`): the committed bases', blue-ruled alone; a
base whose decoder also learned sepia-grid is built on demand (docs/toy-hard.md, "A second style");
`style_metric.style_through_vae` measures how much of a style a VAE can show.

The style set on disk (`lcmlora toy style --hard`) has the easy style set's layout
(`components/toy/style.py`): `NNNNN.png` (64x64 RGB), `NNNNN.txt` (the plain hard caption) and
`metadata.jsonl` with one `{"key", "file", "caption", "parts", "left_index", "right_index"}` row
per sample, plus `settings.json` (`count`, `seed`, `layout`: the scene layout, toy.hard.layout,
`style`: toy.hard.style). Deterministic for a seed; a set of another layout or style is refused
by name when read for a given one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.toy.folder_settings import stale_settings
from components.toy.hard.render import (
    HARD_SIZE,
    Scene,
    caption_for,
    pil_to_tensor_array,
    random_scene,
    render_scene,
)
from components.toy.style import write_style_set

STYLE_PAPER = np.array([195.0, 212.0, 240.0])  # blue-ruled: cool blue paper
STYLE_STRIPE = np.array([170.0, 190.0, 228.0])  # its diagonal stripes
STYLE_FRAME = np.array([110.0, 130.0, 185.0])  # the frame
STRIPE_HALF_PERIOD = 4  # stripe width in pixels (style_metric.style_features)
FRAME_WIDTH = 2  # pixels; the digits never reach it
SEPIA_PAPER = np.array([240.0, 222.0, 188.0])  # sepia-grid: warm sepia paper
SEPIA_GRID = np.array([212.0, 184.0, 140.0])  # its light brown grid lines (darker ones break the judges' digit reads)
SEPIA_GRID_PERIOD = 8  # pixels between grid lines, both ways
SEPIA_INK_OPACITY = 0.9  # washed ink (0.75: the judges read 0.70 of the scenes; 0.9: 0.97)


def style_background() -> np.ndarray:
    """The blue-ruled paper: 64 x 64 x 3 floats 0-255 (stripes, then the frame on top)."""
    yy, xx = np.mgrid[0:HARD_SIZE, 0:HARD_SIZE]
    stripes = (((xx + yy) // STRIPE_HALF_PERIOD) % 2).astype(np.float64)[..., None]
    frame = np.zeros((HARD_SIZE, HARD_SIZE, 1))
    frame[:FRAME_WIDTH], frame[-FRAME_WIDTH:], frame[:, :FRAME_WIDTH], frame[:, -FRAME_WIDTH:] = 1, 1, 1, 1
    paper = STYLE_PAPER * (1.0 - stripes) + STYLE_STRIPE * stripes
    return paper * (1.0 - frame) + STYLE_FRAME * frame


def sepia_background() -> np.ndarray:
    """The sepia-grid paper: 64 x 64 x 3 floats 0-255 (a grid line on every SEPIA_GRID_PERIOD-th row and
    column, offset half a period so that no line sits on the image's edge)."""
    yy, xx = np.mgrid[0:HARD_SIZE, 0:HARD_SIZE]
    half = SEPIA_GRID_PERIOD // 2
    grid = ((yy % SEPIA_GRID_PERIOD == half) | (xx % SEPIA_GRID_PERIOD == half)).astype(np.float64)[..., None]
    return SEPIA_PAPER * (1.0 - grid) + SEPIA_GRID * grid


@dataclass(frozen=True)
class HardStyle:
    """One hard style: its paper (a 64 x 64 x 3 background), ink opacity, and the stripe width its
    metric's stripe-energy feature looks for (`style_metric.style_features`)."""

    name: str
    description: str  # what a model card says the style LoRA draws
    background: Callable[[], np.ndarray]
    ink_opacity: float = 1.0
    stripe_half_period: int = STRIPE_HALF_PERIOD


DEFAULT_STYLE = "blue-ruled"
STYLES = {
    "blue-ruled": HardStyle("blue-ruled", "blue ruled paper, framed", style_background),
    "sepia-grid": HardStyle("sepia-grid", "sepia graph paper, washed ink", sepia_background, SEPIA_INK_OPACITY),
}


def hard_style(name: str = DEFAULT_STYLE) -> HardStyle:
    """The style called `name`; ValueError naming the styles for any other."""
    if name not in STYLES:
        raise ValueError(f"toy.hard.style={name!r}: expected one of {', '.join(STYLES)}")
    return STYLES[name]


def render_scene_styled(left8x8: np.ndarray, right8x8: np.ndarray, scene: Scene,
                        rng: np.random.Generator | None = None, layout: str = "narrow",
                        style: str = DEFAULT_STYLE) -> Image.Image:
    """`render_scene` in the hard style `style` (same arguments, same jitter and random draws)."""
    look = hard_style(style)
    return render_scene(left8x8, right8x8, scene, rng, background=look.background(), layout=layout,
                        ink_opacity=look.ink_opacity)


def hard_style_set(count: int, seed: int = 0, layout: str = "narrow",
                   style: str = DEFAULT_STYLE) -> tuple[torch.Tensor, list[str], list[dict]]:
    """`count` random scenes in the hard style `style`: N x 3 x 64 x 64 in [-1, 1], their plain captions,
    and one row per scene (key, caption, parts, digit indices)."""
    from components.toy.classifier import load_sklearn_digits

    if count < 1:
        raise ValueError(f"toy.hard.style_count must be >= 1, got {count}")
    hard_style(style)
    images8, labels = load_sklearn_digits()
    rng = np.random.default_rng(seed)
    arrays, captions, rows = [], [], []
    for n in range(count):
        scene, i, j, right_first = random_scene(labels, rng)
        arrays.append(pil_to_tensor_array(render_scene_styled(images8[i], images8[j], scene, rng, layout, style)))
        captions.append(caption_for(scene, right_first))
        rows.append({"key": f"{n:05d}", "caption": captions[-1], "parts": list(scene.parts()),
                     "left_index": i, "right_index": j})
    return torch.from_numpy(np.stack(arrays)), captions, rows


STYLE_SET_SETTINGS = "settings.json"


def write_hard_style(folder: str | Path, count: int = 2000, seed: int = 0, layout: str = "narrow",
                     style: str = DEFAULT_STYLE) -> Path:
    """Write `count` images in the hard style `style` (scenes in `layout`) with their plain captions,
    metadata.jsonl and settings.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, _, rows = hard_style_set(count, seed, layout, style)
    pixels = ((images.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).byte().numpy()
    write_style_set(folder, rows, (Image.fromarray(array, mode="RGB") for array in pixels))
    settings = {"count": count, "seed": seed, "layout": layout, "style": style}
    (folder / STYLE_SET_SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return folder


def read_hard_style(folder: str | Path, layout: str | None = None, count: int | None = None,
                    seed: int | None = None, style: str | None = None) -> tuple[torch.Tensor, list[str]]:
    """The style set written by `write_hard_style`: N x 3 x 64 x 64 in [-1, 1] and the captions. Each of
    `layout`, `count`, `seed`, `style` that is given must be what the set was written with, else the set is
    refused by name (a style LoRA would learn other scenes than the ones asked for). A set written before
    settings.json (or before it named a style) does not say: it is read as narrow scenes, its rows' count,
    seed 0, blue-ruled (the defaults then)."""
    folder = Path(folder)
    index = folder / "metadata.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no hard style set; write it with `lcmlora toy style --hard`")
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    asked = {"layout": (layout, "narrow"), "count": (count, len(rows)), "seed": (seed, 0),
             "style": (style, DEFAULT_STYLE)}
    stale = stale_settings(folder / STYLE_SET_SETTINGS, {k: v for k, v in asked.items() if v[0] is not None})
    if stale:
        said = "; ".join(f"a hard style set of the {was} {key}, toy.hard.{key} is {now}" if key in ("layout", "style")
                         else f"written with {key} {was}, toy.hard.style_{key} is {now}"
                         for key, (was, now) in stale.items())
        raise ValueError(f"{folder}: {said}; write it again (`lcmlora toy style --hard`) or point "
                         "toy.hard.style_dir elsewhere")
    arrays = [pil_to_tensor_array(Image.open(folder / r["file"])) for r in rows]
    return torch.from_numpy(np.stack(arrays)), [r["caption"] for r in rows]


def vae_training_images(images: torch.Tensor, s) -> torch.Tensor:
    """The VAE's training images: `images` plus round(s.style_fraction x len) scenes in each style of
    s.decoder_styles (the k-th drawn with seed s.seed + 11 + k; blue-ruled alone: the committed bases'
    recipe). A VAE that never saw a style decodes its background as plain paper, so no style LoRA on the
    UNet can draw it (docs/toy-hard.md, "Merge claim")."""
    extra = round(s.style_fraction * len(images))
    if extra == 0:
        return images
    return torch.cat([images, *(hard_style_set(extra, s.seed + 11 + k, s.layout, style)[0]
                                for k, style in enumerate(s.decoder_styles))])
