"""The hard toy style: the same two-digit scenes on blue ruled paper with a frame, and its style set.

`render_scene_styled` draws a scene exactly as `render.py:render_scene` does (same digits, inks,
positions and jitter, the same random draws) on a different background: cool blue paper with
diagonal stripes 4 pixels wide and a 2-pixel dark blue frame. The look is visibly different,
and the hard judges still read all four parts (measured in docs/toy-hard.md, "Merge claim";
darker papers are not read: the judges learned light paper only).

The style set on disk (`lcmlora toy style --hard`) has the easy style set's layout
(`components/toy/style.py`): `NNNNN.png` (64x64 RGB), `NNNNN.txt` (the plain hard caption) and
`metadata.jsonl` with one `{"key", "file", "caption", "parts", "left_index", "right_index"}` row
per sample, plus `settings.json` (`count`, `seed`, `layout`: the scene layout, toy.hard.layout).
Deterministic for a seed; a set of another layout is refused by name when read for a given one.
"""

from __future__ import annotations

import json
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

STYLE_PAPER = np.array([195.0, 212.0, 240.0])  # cool blue paper
STYLE_STRIPE = np.array([170.0, 190.0, 228.0])  # its diagonal stripes
STYLE_FRAME = np.array([110.0, 130.0, 185.0])  # the frame
STRIPE_HALF_PERIOD = 4  # stripe width in pixels (style_metric.style_features)
FRAME_WIDTH = 2  # pixels; the digits never reach it


def style_background() -> np.ndarray:
    """The styled paper: 64 x 64 x 3 floats 0-255 (stripes, then the frame on top)."""
    yy, xx = np.mgrid[0:HARD_SIZE, 0:HARD_SIZE]
    stripes = (((xx + yy) // STRIPE_HALF_PERIOD) % 2).astype(np.float64)[..., None]
    frame = np.zeros((HARD_SIZE, HARD_SIZE, 1))
    frame[:FRAME_WIDTH], frame[-FRAME_WIDTH:], frame[:, :FRAME_WIDTH], frame[:, -FRAME_WIDTH:] = 1, 1, 1, 1
    paper = STYLE_PAPER * (1.0 - stripes) + STYLE_STRIPE * stripes
    return paper * (1.0 - frame) + STYLE_FRAME * frame


def render_scene_styled(left8x8: np.ndarray, right8x8: np.ndarray, scene: Scene,
                        rng: np.random.Generator | None = None, layout: str = "narrow") -> Image.Image:
    """`render_scene` in the hard style (same arguments, same jitter and random draws)."""
    return render_scene(left8x8, right8x8, scene, rng, background=style_background(), layout=layout)


def hard_style_set(count: int, seed: int = 0, layout: str = "narrow") -> tuple[torch.Tensor, list[str], list[dict]]:
    """`count` random scenes in the hard style: N x 3 x 64 x 64 in [-1, 1], their plain captions, and
    one row per scene (key, caption, parts, digit indices)."""
    from components.toy.classifier import load_sklearn_digits

    if count < 1:
        raise ValueError(f"toy.hard.style_count must be >= 1, got {count}")
    images8, labels = load_sklearn_digits()
    rng = np.random.default_rng(seed)
    arrays, captions, rows = [], [], []
    for n in range(count):
        scene, i, j, right_first = random_scene(labels, rng)
        arrays.append(pil_to_tensor_array(render_scene_styled(images8[i], images8[j], scene, rng, layout)))
        captions.append(caption_for(scene, right_first))
        rows.append({"key": f"{n:05d}", "caption": captions[-1], "parts": list(scene.parts()),
                     "left_index": i, "right_index": j})
    return torch.from_numpy(np.stack(arrays)), captions, rows


STYLE_SET_SETTINGS = "settings.json"


def write_hard_style(folder: str | Path, count: int = 2000, seed: int = 0, layout: str = "narrow") -> Path:
    """Write `count` hard-style images (scenes in `layout`) with their plain captions, metadata.jsonl and
    settings.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, _, rows = hard_style_set(count, seed, layout)
    pixels = ((images.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).byte().numpy()
    write_style_set(folder, rows, (Image.fromarray(array, mode="RGB") for array in pixels))
    settings = {"count": count, "seed": seed, "layout": layout}
    (folder / STYLE_SET_SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return folder


def read_hard_style(folder: str | Path, layout: str | None = None, count: int | None = None,
                    seed: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """The style set written by `write_hard_style`: N x 3 x 64 x 64 in [-1, 1] and the captions. Each of
    `layout`, `count`, `seed` that is given must be what the set was written with, else the set is refused
    by name (a style LoRA would learn other scenes than the ones asked for). A set written before
    settings.json does not say: it is read as narrow scenes, its rows' count, seed 0 (the defaults then)."""
    folder = Path(folder)
    index = folder / "metadata.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no hard style set; write it with `lcmlora toy style --hard`")
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    asked = {"layout": (layout, "narrow"), "count": (count, len(rows)), "seed": (seed, 0)}
    stale = stale_settings(folder / STYLE_SET_SETTINGS, {k: v for k, v in asked.items() if v[0] is not None})
    if stale:
        said = "; ".join(f"a hard style set of the {was} layout, toy.hard.layout is {now}" if key == "layout"
                         else f"written with {key} {was}, toy.hard.style_{key} is {now}"
                         for key, (was, now) in stale.items())
        raise ValueError(f"{folder}: {said}; write it again (`lcmlora toy style --hard`) or point "
                         "toy.hard.style_dir elsewhere")
    arrays = [pil_to_tensor_array(Image.open(folder / r["file"])) for r in rows]
    return torch.from_numpy(np.stack(arrays)), [r["caption"] for r in rows]


def vae_training_images(images: torch.Tensor, s) -> torch.Tensor:
    """The VAE's training images: `images` plus round(s.style_fraction x len) hard-style scenes (seed
    s.seed + 11). A VAE that never saw the style decodes every background as plain paper, so no
    style LoRA on the UNet can draw it (docs/toy-hard.md, "Merge claim")."""
    extra = round(s.style_fraction * len(images))
    if extra == 0:
        return images
    return torch.cat([images, hard_style_set(extra, s.seed + 11, s.layout)[0]])
