"""Prompt adherence: how well images follow their prompts, with a pluggable judge.

Real bases: CLIP score (Hessel et al. 2021, as in torchmetrics): 100 * max(cos(E_I, E_T), 0)
averaged over images, with a CLIP checkpoint from a local folder. Other judges (the toy
world's digit accuracy) plug in through `components/evaluate/judges.py`.

An adherence metric is any callable `(images Bx3xHxW in [-1, 1], prompts: list[str]) -> float`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

AdherenceMetric = Callable[[torch.Tensor, list[str]], float]


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Mean of 100 * max(cos(image_i, text_i), 0) over paired rows (B x D each)."""
    img = torch.nn.functional.normalize(image_embeds.double(), dim=-1)
    txt = torch.nn.functional.normalize(text_embeds.double(), dim=-1)
    return float((100.0 * (img * txt).sum(dim=-1)).clamp(min=0.0).mean())


def to_uint8_hwc(images: torch.Tensor) -> list[np.ndarray]:
    """Bx3xHxW in [-1, 1] -> list of HxWx3 uint8 arrays (what image processors expect)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return list(arr.permute(0, 2, 3, 1).numpy())


def clip_score_metric(path: str | Path | None, device: str = "cpu", batch_size: int = 32,
                      params_key: str = "evaluate.clip_model") -> AdherenceMetric:
    """CLIP score with a CLIP checkpoint (CLIPModel + processor files) from a local folder.

    A missing folder is an error naming the params key: a real base never skips adherence.
    """
    if not path:
        raise FileNotFoundError(f"{params_key} is not set: prompt adherence for a real base needs a local CLIP "
                                f"folder (CLIPModel weights + processor files); set {params_key}=/path/to/clip")
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{params_key}={path}: not a CLIP folder (no config.json); "
                                "save one with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)

    @torch.no_grad()
    def metric(images: torch.Tensor, prompts: list[str]) -> float:
        img_embeds, txt_embeds = [], []
        for i in range(0, images.shape[0], batch_size):
            batch = processor(text=prompts[i:i + batch_size], images=to_uint8_hwc(images[i:i + batch_size]),
                              return_tensors="pt", padding=True, truncation=True)
            img_embeds.append(_as_tensor(model.get_image_features(pixel_values=batch["pixel_values"].to(device))))
            txt_embeds.append(_as_tensor(model.get_text_features(input_ids=batch["input_ids"].to(device),
                                                                 attention_mask=batch["attention_mask"].to(device))))
        return clip_score_from_embeddings(torch.cat(img_embeds), torch.cat(txt_embeds))

    return metric


def _as_tensor(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding."""
    if isinstance(output, torch.Tensor):
        return output
    value = getattr(output, "pooler_output", None)
    if isinstance(value, torch.Tensor):
        return value
    raise TypeError(f"CLIP model returned {type(output).__name__}; expected projected embeddings")
