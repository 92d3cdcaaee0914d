"""The toy world's settings: params.yaml's `toy:` section, validated here.

Production's `Params` keeps `toy` as an opaque mapping; `toy_config(params)` checks it with
the frozen model below, so a typo in a toy key still fails, named (`toy.trian_steps: unknown
key`), when a toy command reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components.config import ConfigError, Params

M = TypeVar("M", bound=BaseModel)


class ToyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    seed: int = 0  # seeds the toy source defects and the toy base training
    source_dir: str = "data/toy/source"  # where `lcmlora toy source` writes
    base_dir: str = "data/toy/base"  # where `lcmlora toy base` writes (committed)
    style_dir: str = "data/toy/style"  # where the toy style set is written
    image_size: int = 32  # pixel size of toy images
    train_steps: int = 3000  # toy base UNet training steps
    batch_size: int = 128  # toy base training batch
    classifier_dir: str = "data/toy/classifier"  # where `lcmlora toy classifier` writes (committed)
    classifier_epochs: int = 12  # digit classifier training epochs
    copies: int = 4  # jittered renderings of each digit in the toy base training set
    vae_steps: int = 1500  # toy VAE training steps
    vae_batch_size: int = 64  # toy VAE training batch
    vae_lr: float = 1.0e-3  # toy VAE peak learning rate (one-cycle)
    kl_weight: float = 1.0e-4  # weight of the VAE's KL term (per latent element)
    style_fraction: float = 0.25  # share of toy-style images in the VAE training set
    lr: float = 1.0e-3  # toy UNet peak learning rate (warm-up, cosine to 10%)
    warmup_steps: int = 100  # toy UNet learning-rate warm-up steps
    caption_dropout: float = 0.1  # share of captions replaced by "" (for classifier-free guidance)
    ema_decay: float = 0.999  # EMA of the UNet weights; the EMA is what gets evaluated and saved
    eval_every: int = 250  # steps between DDIM-50 CFG accuracy checks of the EMA (best kept)
    eval_samples: int = 200  # samples per accuracy check during training
    final_eval_samples: int = 500  # samples per guidance scale in the final accuracy table
    final_guidance_scales: list[float] = Field(  # guidance scales of the final accuracy table
        default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 4.0])
    min_accuracy: float = 0.8  # `toy base` fails if the prompted-digit accuracy at the toy guidance is lower
    style_count: int = 500  # images in the toy style set
    device: str = "cpu"  # torch device for toy training (cuda if you have one)
    threads: int = 2  # torch CPU threads for toy training
    # toy style LoRA (`lcmlora toy style-lora`): plain diffusion LoRA fine-tuning of the toy base
    style_output: str = "data/toy/style_lora"  # where the toy style LoRA is written
    style_rank: int = 16  # LoRA rank (8 kept the style but lost digit shapes: accuracy 0.31)
    style_alpha: float = 8.0  # LoRA alpha (alpha != rank: exercises alpha scaling downstream)
    style_steps: int = 1500  # optimizer steps
    style_batch_size: int = 64  # images per step
    style_lr: float = 2e-3  # AdamW learning rate
    style_seed: int = 0  # data order, noise, init
    hard: dict[str, Any] = Field(default_factory=dict)  # the hard toy's settings (components/toy/hard/config.py)


def validate_section(model: type[M], section: Mapping[str, Any], prefix: str, source: str = "params") -> M:
    """Validate a mapping with `model`; ConfigError names every bad key as `PREFIX.KEY`."""
    try:
        return model.model_validate(dict(section))
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join([prefix, *(str(p) for p in e["loc"])])
            msg = "unknown key; remove it or fix its spelling" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"{source}: {key}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def parse_toy_config(section: Mapping[str, Any], source: str = "params") -> ToyConfig:
    """Validate a `toy:` mapping; ConfigError names every bad key as `toy.KEY`."""
    return validate_section(ToyConfig, section, "toy", source)


def toy_config(params: Params) -> ToyConfig:
    """The validated `toy:` section of resolved params."""
    return parse_toy_config(params.toy)
