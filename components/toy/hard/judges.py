"""The hard toy's judges: a small CNN that reads both digits and both colours of a 64x64 image.

Each 32-pixel half of the image (3x64x32) goes through one shared CNN with a
digit head (10-way) and a colour head (4-way); since each half is read on its own, the
readings carry the positions. A sample *adheres* to its prompt when all four parts (left
digit, left colour, right digit, right colour) are right. The FD features are the two halves'
64-d penultimate pre-activations side by side (128-d).

Weights live in `data/toy/hard/judges/` (`model.safetensors` + `config.json`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.toy import classifier
from components.toy.hard.render import COLOURS, HARD_SIZE, Scene

INPUT_HW = (64, 32)  # each half is read at full resolution (height, width)
FEATURE_DIM = 64  # per half; the FD features are 2 x FEATURE_DIM


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 conv, batch norm, ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class HalfNet(nn.Module):
    """A stem (64x32 -> 32x16), two conv-BN stages (-> 16x8 -> 8x4), a feature layer, digit and colour heads."""

    def __init__(self, widths: tuple[int, int] = (32, 64), feature_dim: int = FEATURE_DIM):
        super().__init__()
        w1, w2 = widths
        self.convs = nn.Sequential(
            *_conv(3, 16), nn.MaxPool2d(2),
            *_conv(16, w1), *_conv(w1, w1), nn.MaxPool2d(2),
            *_conv(w1, w2), *_conv(w2, w2), nn.MaxPool2d(2),
        )
        self.feature = nn.Linear(w2 * (INPUT_HW[0] // 8) * (INPUT_HW[1] // 8), feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.digit_head = nn.Linear(feature_dim, 10)
        self.colour_head = nn.Linear(feature_dim, len(COLOURS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Bx3x64x32 in [-1, 1] -> B x feature_dim."""
        return self.feature(self.convs(x).flatten(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.dropout(F.relu(self.features(x)))
        return self.digit_head(h), self.colour_head(h)


def to_halves(images: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW in [-1, 1] (any size) -> 2B x 3 x 64 x 32: all left halves, then all right halves."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"hard judges: expected images Bx3xHxW in [-1, 1], got {tuple(images.shape)}")
    images = images.float()
    if images.shape[-2:] != (HARD_SIZE, HARD_SIZE):
        images = F.interpolate(images, size=(HARD_SIZE, HARD_SIZE), mode="bilinear", antialias=True,
                               align_corners=False)
    images = images.clamp(-1.0, 1.0)
    half = INPUT_HW[1]
    return torch.cat([images[..., :half], images[..., half:]])


@dataclass
class HardJudges(classifier.TrainedNet):
    """A trained HalfNet behind the project's image convention: Bx3xHxW floats in [-1, 1]."""

    net: HalfNet

    @property
    def layout(self) -> str:
        """The render layout the judges were trained on (render.py:LAYOUTS; judges from before it: narrow)."""
        return self.meta.get("layout", "narrow")

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> torch.Tensor:
        """B x 4 readings: (left digit, left colour, right digit, right colour)."""
        digit, colour = self.net(to_halves(images))
        b = images.shape[0]
        d, c = digit.argmax(1).view(2, b), colour.argmax(1).view(2, b)
        return torch.stack([d[0], c[0], d[1], c[1]], dim=1)

    @torch.no_grad()
    def adheres(self, images: torch.Tensor, scenes: list[Scene]) -> torch.Tensor:
        """B booleans: all four parts of each image read as its scene."""
        want = torch.tensor([s.parts() for s in scenes])
        return (self.read(images) == want).all(dim=1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """B x 128 features for a Frechet distance: left half's 64, then right half's 64."""
        feats = self.net.features(to_halves(images))
        return torch.cat(feats.chunk(2), dim=1)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The digit classifier's augmentation (`components/toy/classifier.py:augment`) on judge inputs
    (Bx3x64x32), with milder contrast and offset."""
    return classifier.augment(images, generator, contrast=(0.7, 0.3), offset=0.3)


def train_judges(images: torch.Tensor, parts: torch.Tensor, *, epochs: int = 8, batch_size: int = 128,
                 lr: float = 2e-3, seed: int = 0, callback: Callable[[int, int, float], None] | None = None
                 ) -> HardJudges:
    """Train on N x 3 x 64 x 64 renders with their N x 4 parts (the digit classifier's loop,
    `classifier.py:fit`, on both halves); `callback(step, total, loss)` per step."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = to_halves(images)
    digits = torch.cat([parts[:, 0], parts[:, 2]]).long()
    colours = torch.cat([parts[:, 1], parts[:, 3]]).long()

    def loss_of(logits: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        digit_logits, colour_logits = logits
        return F.cross_entropy(digit_logits, digits[idx]) + F.cross_entropy(colour_logits, colours[idx])

    net = classifier.fit(HalfNet().train(), x, loss_of, generator, epochs=epochs, batch_size=batch_size, lr=lr,
                         augment=augment, on_step=callback)
    return HardJudges(net)


def read_all(judges: HardJudges, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """N x 4 readings of N images, `batch_size` at a time."""
    return torch.cat([judges.read(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def adherence(judges: HardJudges, images: torch.Tensor, parts: torch.Tensor, batch_size: int = 500) -> float:
    """Share of N images (Nx3xHxW in [-1, 1]) whose four readings all equal `parts` (N x 4)."""
    return float((read_all(judges, images, batch_size) == parts.long()).all(dim=1).float().mean())


def swapped_sides(judges: HardJudges, images: torch.Tensor, parts: torch.Tensor, batch_size: int = 500) -> float:
    """Share of N images read as their scene with left and right exchanged (both sides' digit and colour).

    Scenes whose two sides are alike (same digit and colour) count as not swapped. A base that
    draws the right digits and colours on a random side scores about half its content accuracy.
    """
    reads = read_all(judges, images, batch_size)
    parts = parts.long()
    exchanged = parts[:, [2, 3, 0, 1]]
    distinct = (parts != exchanged).any(dim=1)
    return float(((reads == exchanged).all(dim=1) & distinct).float().mean())


def save_judges(judges: HardJudges, path: str | Path, meta: dict | None = None) -> Path:
    """Write `model.safetensors` and `config.json` (architecture and `meta`) to `path`."""
    config = {"input_hw": list(INPUT_HW), "widths": [32, 64], "feature_dim": FEATURE_DIM, **(meta or judges.meta)}
    return classifier.save_weights(judges.net, path, config)


def load_judges(path: str | Path, device: str | torch.device = "cpu") -> HardJudges:
    """Load the judges from `path` (a folder written by `save_judges`)."""
    state, config = classifier.read_weights(Path(path), "no hard toy judges (model.safetensors + config.json); "
                                                        "build them with `python -m components.toy.hard judges`")
    net = HalfNet(tuple(config["widths"]), config["feature_dim"])
    net.load_state_dict(state)
    net.to(device)
    return HardJudges(net, meta=config)


def scene_parts(scenes: list[Scene]) -> torch.Tensor:
    """N x 4 long tensor of the scenes' parts."""
    return torch.tensor(np.array([s.parts() for s in scenes]), dtype=torch.long)
