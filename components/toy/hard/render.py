"""Render the hard toy's 64x64 RGB compositions: two coloured sklearn digits, left and right.

A scene is `Scene(left_digit, left_colour, right_digit, right_colour)`; its caption names both
digits with their colours and positions, in either order ("a red seven on the left and a blue
two on the right" or "a blue two on the right and a red seven on the left"), so a model must
bind each colour to its digit and each digit to its side. Every image is drawn from real
sklearn digits (8x8, values 0-16), upsampled into a 26-pixel box in each 32-pixel half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from components.toy.render import DIGIT_WORDS, digit_box, to_image

HARD_SIZE = 64  # pixel size of every hard toy image
HALF = HARD_SIZE // 2  # each digit lives in its own half
DIGIT_BOX = 26  # an 8x8 digit is upsampled to this box inside its 32x64 half
COLOURS = ["red", "green", "blue", "yellow"]
INKS = np.array([[205.0, 30.0, 30.0], [25.0, 140.0, 45.0], [35.0, 55.0, 210.0], [225.0, 175.0, 0.0]])
PAPER = np.array([236.0, 232.0, 222.0])  # light grey-warm paper
SIDES = ["left", "right"]
LAYOUTS = ("narrow", "wide")  # where jittered digits may sit (`render_scene`); the committed bases: narrow
WIDE_MIN_BOX = 18  # the wide layout's smallest digit box (largest: DIGIT_BOX)
HARD_WORDS = ["a", "on", "the", "and", *SIDES, *COLOURS, *DIGIT_WORDS]  # every caption word


@dataclass(frozen=True)
class Scene:
    """What a hard toy image shows: a digit label 0-9 and a colour index 0-3 per side."""

    left_digit: int
    left_colour: int
    right_digit: int
    right_colour: int

    def parts(self) -> tuple[int, int, int, int]:
        """(left digit, left colour, right digit, right colour), the judges' four readings."""
        return self.left_digit, self.left_colour, self.right_digit, self.right_colour

    def mirrored(self) -> Scene:
        """The scene with its two sides exchanged (each digit keeps its colour)."""
        return Scene(self.right_digit, self.right_colour, self.left_digit, self.left_colour)


def caption_for(scene: Scene, right_first: bool = False) -> str:
    """The caption of a scene, left part first unless `right_first`."""
    left = f"a {COLOURS[scene.left_colour]} {DIGIT_WORDS[scene.left_digit]} on the left"
    right = f"a {COLOURS[scene.right_colour]} {DIGIT_WORDS[scene.right_digit]} on the right"
    return f"{right} and {left}" if right_first else f"{left} and {right}"


def render_scene(left8x8: np.ndarray, right8x8: np.ndarray, scene: Scene,
                 rng: np.random.Generator | None = None, background: np.ndarray | None = None,
                 layout: str = "narrow", ink_opacity: float = 1.0) -> Image.Image:
    """Two 8x8 digits (values 0-16) in their scene's colours as a 64x64 RGB image.

    With `rng` paper and inks vary slightly and each digit moves: in the `narrow` layout by up to
    2 pixels sideways and 6 up or down (26-pixel box); in the `wide` layout its box is 18-26 pixels
    and sits anywhere in its half, so a caption leaves the digit's place and size open (what a
    few-step sampler must then settle). With `rng=None` the rendering is canonical (centred 26-pixel
    box, fixed colours) in either layout. `background` (64 x 64 x 3, 0-255) replaces the plain paper
    and `ink_opacity` < 1 lets it show through the ink (the hard styles, `style.py`; no random draw
    depends on either).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    paper = PAPER if background is None else np.asarray(background, dtype=np.float64)
    paper = paper if rng is None else paper + rng.uniform(-10.0, 10.0, size=3)
    rgb = np.broadcast_to(paper, (HARD_SIZE, HARD_SIZE, 3)).copy()
    margin_x, margin_y = (HALF - DIGIT_BOX) // 2, (HARD_SIZE - DIGIT_BOX) // 2
    for side, (digit, colour) in enumerate([(left8x8, scene.left_colour), (right8x8, scene.right_colour)]):
        ink = INKS[colour] if rng is None else np.clip(INKS[colour] + rng.uniform(-18.0, 18.0, size=3), 0, 255)
        if rng is None:
            size, top, left = DIGIT_BOX, margin_y, side * HALF + margin_x
        elif layout == "narrow":
            dx, dy = int(rng.integers(-2, 3)), int(rng.integers(-6, 7))
            size, top, left = DIGIT_BOX, margin_y + dy, side * HALF + margin_x + dx
        else:
            size = int(rng.integers(WIDE_MIN_BOX, DIGIT_BOX + 1))
            left = side * HALF + int(rng.integers(0, HALF - size + 1))
            top = int(rng.integers(0, HARD_SIZE - size + 1))
        mask = digit_box(digit, size)[..., None] * ink_opacity
        window = rgb[top:top + size, left:left + size]
        rgb[top:top + size, left:left + size] = window * (1.0 - mask) + ink * mask
    return to_image(rgb)


# Papers the source may draw scenes on besides the plain one (`toy.hard.look_fraction`): real
# sources hold many looks, the toy's one. Made to test whether an LCM-LoRA distilled on one look
# overrides a style LoRA's (docs/results.md, "Session 8": distilled on half other looks, it still
# does). None of them is the hard style's (blue diagonal stripes and a frame, `style.py`): warm,
# green, pink, grey and lilac papers, some ruled across.
LOOK_PAPERS = np.array([[246.0, 236.0, 200.0], [226.0, 240.0, 214.0], [244.0, 218.0, 222.0],
                        [214.0, 214.0, 214.0], [250.0, 224.0, 196.0], [232.0, 228.0, 246.0]])
LOOK_RULE_DARKEN = 40.0  # a ruled paper's lines, this much darker than its paper
LOOK_RULE_PERIODS = (6, 8, 10)  # pixels between a ruled paper's horizontal lines


def random_look(rng: np.random.Generator) -> np.ndarray:
    """A paper other than the plain one and the hard style's: 64 x 64 x 3 floats 0-255 (`render_scene`'s
    `background`). One of `LOOK_PAPERS`, tinted by up to 12 per channel, ruled across half the time."""
    paper = LOOK_PAPERS[rng.integers(len(LOOK_PAPERS))] + rng.uniform(-12.0, 12.0, size=3)
    background = np.broadcast_to(paper, (HARD_SIZE, HARD_SIZE, 3)).copy()
    if rng.random() < 0.5:
        period = int(rng.choice(LOOK_RULE_PERIODS))
        background[int(rng.integers(period))::period] -= LOOK_RULE_DARKEN
    return np.clip(background, 0.0, 255.0)


def random_scene(labels: np.ndarray, rng: np.random.Generator, pool: np.ndarray | None = None
                 ) -> tuple[Scene, int, int, bool]:
    """A random scene from sklearn digits: (scene, left index, right index, right_first).

    `pool` restricts the digit images drawn (e.g. a train or held-out split); colours are
    drawn independently per side.
    """
    pool = np.arange(len(labels)) if pool is None else pool
    i, j = (int(v) for v in rng.choice(pool, size=2))
    colours = rng.integers(0, len(COLOURS), size=2)
    scene = Scene(int(labels[i]), int(colours[0]), int(labels[j]), int(colours[1]))
    return scene, i, j, bool(rng.random() < 0.5)


def pil_to_tensor_array(image: Image.Image) -> np.ndarray:
    """A PIL RGB image -> 3xHxW float32 array in [-1, 1]."""
    return (np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
