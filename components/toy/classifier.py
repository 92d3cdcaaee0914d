"""The toy world's digit classifier: prompt adherence (in place of CLIP) and Frechet features
(in place of Inception) for images drawn by toy bases.

A small CNN reads grey 16x16 images. It is trained on sklearn's digits rendered exactly as
the toy source renders them (`components/toy/render.py`), in both the plain and the style
rendering, with blur, noise and contrast augmentation so that it also reads the softer
images a VAE decodes. The held-out split is a stratified 20% of sklearn's 1,797 digits.

Weights live in `data/toy/classifier/` (`model.safetensors` + `config.json`), rebuilt by
`lcmlora toy classifier`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from components.paths import project_path
from components.progress import Progress, ProgressFn
from components.toy.render import render_digit, render_digit_styled

DEFAULT_CLASSIFIER_DIR = "data/toy/classifier"
INPUT_SIZE = 16  # the classifier reads grey INPUT_SIZE x INPUT_SIZE images
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 RGB -> grey weights


class DigitNet(nn.Module):
    """Two conv stages (16 -> 8 -> 4 pixels), a feature layer and a 10-way head."""

    def __init__(self, widths: tuple[int, int] = (32, 64), feature_dim: int = 64):
        super().__init__()
        w1, w2 = widths
        self.convs = nn.Sequential(
            nn.Conv2d(1, w1, 3, padding=1), nn.ReLU(), nn.Conv2d(w1, w1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(), nn.Conv2d(w2, w2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.feature = nn.Linear(w2 * (INPUT_SIZE // 4) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Bx1x16x16 grey in [-1, 1] -> B x feature_dim (pre-activation of the penultimate layer)."""
        return self.feature(self.convs(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.features(x))))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Bx3xHxW (or Bx1xHxW) in [-1, 1], any H, W -> Bx1x16x16 grey in [-1, 1]."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"digit classifier: expected images Bx3xHxW or Bx1xHxW in [-1, 1], got {tuple(images.shape)}")
    images = images.float()
    if images.shape[1] == 3:
        luma = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        images = (images * luma).sum(1, keepdim=True)
    if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                               align_corners=False)
    return images.clamp(-1.0, 1.0)


@dataclass
class TrainedNet:
    """A trained network, frozen for reading, with the config of its folder (`meta`, `save_weights`)."""

    net: nn.Module
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.net.eval().requires_grad_(False)


@dataclass
class DigitClassifier(TrainedNet):
    """A trained DigitNet behind the image convention of the project: Bx3xHxW floats in [-1, 1]."""

    net: DigitNet

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """B x 10 class logits."""
        return self.net(to_classifier_input(images).to(self.device))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """B predicted digit labels (LongTensor)."""
        return self.logits(images).argmax(dim=1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """B x 64 penultimate-layer features, for a Frechet distance between image sets."""
        return self.net.features(to_classifier_input(images).to(self.device))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> DigitClassifier:
        self.net.to(device)
        return self


# --- data -------------------------------------------------------------------------------


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 handwritten digits: (N x 8 x 8 values 0-16, N labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def pil_to_tensor(image) -> torch.Tensor:
    """A PIL RGB image -> 3xHxW float tensor in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def digit_split(labels: np.ndarray, seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train_idx, test_idx) of sklearn's digits; the test part is the classifier's held-out set."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_test = round(len(idx) * test_fraction)
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def render_set(images8: np.ndarray, rng: np.random.Generator | None, styled: bool = False) -> torch.Tensor:
    """Render 8x8 digits as toy images: N x 3 x 32 x 32 in [-1, 1]."""
    render = render_digit_styled if styled else render_digit
    return torch.stack([pil_to_tensor(render(im, rng)) for im in images8])


def augment(images: torch.Tensor, generator: torch.Generator, contrast: tuple[float, float] = (0.6, 0.4),
            offset: float = 0.4) -> torch.Tensor:
    """Random blur, contrast (`contrast[0] + contrast[1] * U`) and offset (`offset * (U - 0.5)`) and noise on
    classifier inputs (B x C x H x W), so decoded images read well."""
    b = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=generator) * 0.8
    images = images * (1 - mix) + blurred * mix
    scale = contrast[0] + contrast[1] * torch.rand(b, 1, 1, 1, generator=generator)
    shift = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * offset
    noise = torch.randn(images.shape, generator=generator) * 0.1 * torch.rand(b, 1, 1, 1, generator=generator)
    return (images * scale + shift + noise).clamp(-1.0, 1.0)


# --- training ---------------------------------------------------------------------------


def fit(net: nn.Module, x: torch.Tensor, loss_of: Callable[[Any, torch.Tensor], torch.Tensor],
        generator: torch.Generator, *, epochs: int, batch_size: int, lr: float,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] = augment,
        on_step: Callable[[int, int, float], None] | None = None) -> nn.Module:
    """Train `net` in place on inputs x (N x ...): `epochs` shuffled passes of `batch_size`, Adam at `lr` with
    cosine decay over all steps, `loss_of(net(augment(x[idx])), idx)` per batch; `on_step(step, total, loss)`."""
    total = epochs * -(-len(x) // batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = loss_of(net(augment(x[idx], generator)), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if on_step is not None:
                on_step(step, total, float(loss.detach()))
    return net


def train_digit_classifier(images8: np.ndarray, labels: np.ndarray, *, epochs: int = 12, copies: int = 4,
                           batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                           progress: ProgressFn | None = None) -> DigitClassifier:
    """Train a DigitClassifier on 8x8 digits (N x 8 x 8, values 0-16) with labels (N,).

    Each digit is rendered `copies` times with jitter (plain rendering) and once styled;
    `progress` gets one report (stage toy-classifier, loss) after each optimizer step.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # 1. Render the training set once: jittered plain copies plus one styled copy per digit.
    x = torch.cat([render_set(images8, rng) for _ in range(copies)] + [render_set(images8, rng, styled=True)])
    y = torch.from_numpy(np.tile(np.asarray(labels), copies + 1)).long()
    x = to_classifier_input(x)
    # 2. Adam with a cosine schedule over all steps.
    report = None if progress is None else (
        lambda step, total, loss: progress(Progress(stage="toy-classifier", step=step, total=total,
                                                    metrics={"loss": loss})))
    net = fit(DigitNet(), x, lambda logits, idx: F.cross_entropy(logits, y[idx]), generator, epochs=epochs,
              batch_size=batch_size, lr=lr, on_step=report)
    return DigitClassifier(net)


def accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor | np.ndarray,
             batch_size: int = 512) -> float:
    """Fraction of `images` (Bx3xHxW in [-1, 1]) whose predicted digit equals `labels`."""
    labels = torch.as_tensor(np.asarray(labels)).long()
    preds = torch.cat([classifier.predict(images[i:i + batch_size]).cpu() for i in range(0, len(images), batch_size)])
    return float((preds == labels).float().mean())


# --- persistence ------------------------------------------------------------------------


def save_weights(net: nn.Module, path: str | Path, config: dict) -> Path:
    """Write `net`'s weights (`model.safetensors`) and `config` (`config.json`) to the folder `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def read_weights(folder: Path, missing: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights and config `save_weights` wrote to `folder`; FileNotFoundError saying `missing`
    (what is not there, and how to build it) when either file is absent."""
    weights, config_file = folder / "model.safetensors", folder / "config.json"
    if not weights.exists() or not config_file.exists():
        raise FileNotFoundError(f"{folder}: {missing}")
    return load_file(str(weights)), json.loads(config_file.read_text())


def save_digit_classifier(classifier: DigitClassifier, path: str | Path, meta: dict | None = None) -> Path:
    """Write `model.safetensors` and `config.json` (architecture and `meta`, e.g. accuracies) to `path`."""
    config = {"input_size": INPUT_SIZE, "widths": [32, 64], "feature_dim": 64, **(meta or classifier.meta)}
    return save_weights(classifier.net, path, config)


def load_digit_classifier(path: str | Path = DEFAULT_CLASSIFIER_DIR, device: str | torch.device = "cpu"
                          ) -> DigitClassifier:
    """Load the classifier from `path` (relative paths fall back to the project root)."""
    folder = project_path(path)
    state, config = read_weights(folder, "no digit classifier (model.safetensors + config.json); "
                                         "build it with `lcmlora toy classifier`")
    if config.get("input_size") != INPUT_SIZE:
        raise ValueError(f"{folder / 'config.json'}: input_size {config.get('input_size')} != {INPUT_SIZE} of this "
                         "code; rebuild with `lcmlora toy classifier`")
    net = DigitNet(tuple(config["widths"]), config["feature_dim"])
    net.load_state_dict(state)
    return DigitClassifier(net, meta=config).to(device)
