"""Build the toy world's committed models: the digit classifier and the toy base.

Each builder loads sklearn's digits, trains (`components/toy/classifier.py`,
`components/toy/base.py`), checks the result against its threshold, and writes the model
with a JSON report and the resolved config beside it.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from components.config import Params
from components.progress import ProgressFn
from components.toy.base import save_toy_base, train_toy_base
from components.toy.classifier import (
    accuracy,
    digit_split,
    load_digit_classifier,
    load_sklearn_digits,
    render_set,
    save_digit_classifier,
    train_digit_classifier,
)
from components.toy.config import ToyConfig, toy_config

MIN_CLASSIFIER_ACCURACY = 0.97  # held-out accuracy the committed digit classifier must reach
TOY_BASE_NAME = "toy"  # the base in params.yaml `bases:` whose guidance scale the toy base is selected at


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def build_digit_classifier(cfg: ToyConfig, progress: ProgressFn | None = None) -> dict:
    """Train the classifier on the training split, measure the held-out split, save to cfg.classifier_dir.

    Raises ValueError (and saves nothing) when held-out accuracy is below MIN_CLASSIFIER_ACCURACY.
    """
    images8, labels = load_sklearn_digits()
    train_idx, test_idx = digit_split(labels, cfg.seed)
    start = time.time()
    classifier = train_digit_classifier(
        images8[train_idx], labels[train_idx], epochs=cfg.classifier_epochs, seed=cfg.seed,
        progress=progress)
    rng = np.random.default_rng(cfg.seed + 100)
    held_out = {
        "heldout_accuracy": accuracy(classifier, render_set(images8[test_idx], None), labels[test_idx]),
        "heldout_accuracy_jittered": accuracy(classifier, render_set(images8[test_idx], rng), labels[test_idx]),
        "heldout_accuracy_styled": accuracy(classifier, render_set(images8[test_idx], rng, styled=True),
                                            labels[test_idx]),
    }
    if held_out["heldout_accuracy"] < MIN_CLASSIFIER_ACCURACY:
        raise ValueError(f"digit classifier: held-out accuracy {held_out['heldout_accuracy']:.4f} < "
                         f"{MIN_CLASSIFIER_ACCURACY}; raise toy.classifier_epochs")
    report = {**held_out, "train_size": len(train_idx), "heldout_size": len(test_idx),
              "seed": cfg.seed, "epochs": cfg.classifier_epochs, "train_s": round(time.time() - start, 1)}
    save_digit_classifier(classifier, cfg.classifier_dir, report)
    return report


def build_toy_base(params: Params, progress: ProgressFn | None = None) -> dict:
    """Train the toy base, save it to params.toy.base_dir with `training.json` (report + resolved params)."""
    cfg = toy_config(params)
    guidance = params.base(TOY_BASE_NAME).guidance_scale
    classifier = load_digit_classifier(cfg.classifier_dir)
    images8, labels = load_sklearn_digits()
    start = time.time()
    result = train_toy_base(images8, labels, classifier, cfg, guidance, progress)
    wall = time.time() - start
    folder = save_toy_base(result.pipe, cfg.base_dir)
    report = {
        "guidance_scale": guidance,
        "best_step": result.best_step,
        "best_accuracy": result.best_accuracy,
        "eval_samples": cfg.eval_samples,
        "final_accuracy": result.final_accuracy,
        "final_eval_samples": cfg.final_eval_samples,
        "vae_mse": result.vae_mse,
        "history": result.history,
        "wall_s": round(wall, 1),
        "device": _device_name(cfg.device),
        "torch": torch.__version__,
        "parameters": {name: sum(p.numel() for p in getattr(result.pipe, name).parameters())
                       for name in ("unet", "vae", "text_encoder")},
    }
    (Path(folder) / "training.json").write_text(
        json.dumps({**report, "params": params.model_dump(mode="json")}, indent=2) + "\n")
    return report
