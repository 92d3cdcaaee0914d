"""Render sklearn's 8x8 handwritten digits as the toy world's 32x32 RGB images.

One rendering is shared by the toy source writer (`components/toy/source.py`), the toy base
training (`components/toy/base.py`) and the digit classifier, so that what the base learns
to draw is what the classifier learned to read. `render_digit_styled` draws the same digits
in the toy *style* (neon strokes on a dark, striped background), the set a style LoRA is
trained on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TOY_SIZE = 32  # pixel size of every toy image
_DIGIT_BOX = 28  # the 8x8 digit is upsampled to this box, leaving a 2-pixel margin
_PAPER = np.array([245.0, 241.0, 230.0])  # light, slightly warm background
_INK = np.array([24.0, 32.0, 96.0])  # dark blue ink
_STYLE_BG = np.array([18.0, 8.0, 38.0])  # dark violet night
_STYLE_STRIPE = np.array([40.0, 18.0, 70.0])  # diagonal stripes of the style background
_STYLE_CORE = np.array([255.0, 250.0, 255.0])  # white-hot stroke core
_STYLE_GLOW = np.array([255.0, 40.0, 200.0])  # magenta neon glow


def caption_for(label: int) -> str:
    """The toy caption of a digit label: 7 -> "a handwritten digit seven"."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"caption_for: digit label must be 0-9, got {label!r}")
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def _check_digit(image8x8: np.ndarray) -> np.ndarray:
    arr = np.asarray(image8x8, dtype=np.float64)
    if arr.shape == (64,):
        arr = arr.reshape(8, 8)
    if arr.shape != (8, 8):
        raise ValueError(f"render_digit: expected an 8x8 sklearn digit (values 0-16), got shape {arr.shape}")
    return np.clip(arr / 16.0, 0.0, 1.0)


def digit_box(image8x8: np.ndarray, box: int) -> np.ndarray:
    """Ink coverage in [0, 1], box x box: an sklearn digit (8x8, values 0-16) upsampled bicubically."""
    small = Image.fromarray((_check_digit(image8x8) * 255.0).astype(np.uint8), mode="L")
    return np.asarray(small.resize((box, box), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0


def _ink_mask(image8x8: np.ndarray, rng: np.random.Generator | None, box: int = _DIGIT_BOX) -> np.ndarray:
    """Ink coverage in [0, 1], TOY_SIZE x TOY_SIZE: the digit upsampled into a box, optionally shifted."""
    digit = digit_box(image8x8, box)
    canvas = np.zeros((TOY_SIZE, TOY_SIZE))
    margin = (TOY_SIZE - box) // 2
    dy, dx = (0, 0) if rng is None else (int(v) for v in rng.integers(-1, 2, size=2))
    top, left = margin + dy, margin + dx
    canvas[top:top + box, left:left + box] = digit
    return np.clip(canvas, 0.0, 1.0)


def to_image(rgb: np.ndarray) -> Image.Image:
    """H x W x 3 floats 0-255 as an RGB image (rounded, clipped)."""
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB")


def render_digit(image8x8: np.ndarray, rng: np.random.Generator | None = None) -> Image.Image:
    """An sklearn digit (8x8, values 0-16) as a 32x32 RGB toy image: dark ink on light paper.

    With `rng`, the digit shifts by up to one pixel and ink and paper colours vary slightly;
    with `rng=None` the rendering is canonical (centred, fixed colours).
    """
    mask = _ink_mask(image8x8, rng)[..., None]
    paper, ink = _PAPER, _INK
    if rng is not None:
        paper = paper + rng.uniform(-8.0, 8.0, size=3)
        ink = ink + rng.uniform(-16.0, 16.0, size=3)
    return to_image(paper * (1.0 - mask) + ink * mask)


def render_digit_styled(image8x8: np.ndarray, rng: np.random.Generator | None = None) -> Image.Image:
    """The same digit in the toy style: white-hot neon strokes with a wide magenta glow on a
    dark background with diagonal stripes. Same size and jitter rules as `render_digit`."""
    mask = _ink_mask(image8x8, rng)
    as_image = Image.fromarray((mask * 255.0).astype(np.uint8), mode="L")
    core = np.clip((mask - 0.35) * 2.5, 0.0, 1.0)  # the stroke centre, thinner than the ink
    glow = np.asarray(as_image.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.GaussianBlur(1.0)),
                      dtype=np.float64) / 255.0
    yy, xx = np.mgrid[0:TOY_SIZE, 0:TOY_SIZE]
    stripes = (((xx + yy) // 3) % 2).astype(np.float64)[..., None]
    glow_colour = _STYLE_GLOW if rng is None else np.clip(_STYLE_GLOW + rng.uniform(-20.0, 20.0, size=3), 0, 255)
    background = _STYLE_BG * (1.0 - stripes) + _STYLE_STRIPE * stripes
    rgb = background * (1.0 - glow[..., None]) + glow_colour * glow[..., None]
    rgb = rgb * (1.0 - core[..., None]) + _STYLE_CORE * core[..., None]
    return to_image(rgb)
