"""Contrastive (CLIP) pre-training of a hard toy text encoder, before the UNet sees it.

Real bases get their text encoder pre-trained (SD-1.5: OpenAI's CLIP ViT-L; SDXL: that and
OpenCLIP ViT-bigG), and the UNet trains against it frozen. The hard toy's first bases trained
the text encoder from scratch with the UNet on the denoising loss alone; they drew the named
digits and colours on a random side (docs/toy-hard.md, "Status"), and a linear probe on their
text encoder's last token read the left digit 55% of the time. This module trains the
encoder the CLIP way (Radford et al. 2021): a symmetric InfoNCE loss between its pooled output
and a small image tower's embedding of the rendered scene, over batches that hold each scene
with its mirror (the two sides exchanged), so the caption must say which side is which.

The image tower is this module's own and is thrown away; the judges are never used (they are
the evaluation's instrument).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTokenizer

from components.progress import Progress, ProgressFn
from components.toy.hard.base import token_ids
from components.toy.hard.render import (
    HARD_SIZE,
    caption_for,
    pil_to_tensor_array,
    random_scene,
    render_scene,
)


def mirrored_pairs(images8: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator,
                   layout: str = "narrow") -> tuple[torch.Tensor, list[str]]:
    """2n jittered renders and captions: scene k at 2k, its mirror (sides exchanged) at 2k + 1."""
    arrays, captions = [], []
    for _ in range(n):
        scene, i, j, _ = random_scene(labels, rng)
        for shown, left, right in ((scene, i, j), (scene.mirrored(), j, i)):
            arrays.append(pil_to_tensor_array(render_scene(images8[left], images8[right], shown, rng, layout=layout)))
            captions.append(caption_for(shown, right_first=bool(rng.random() < 0.5)))
    return torch.from_numpy(np.stack(arrays)), captions


class ImageTower(nn.Module):
    """3 x 64 x 64 -> `dim`: three stride-2 convolutions, then a linear map of the flattened 8x8 grid
    (flattened, not pooled, so where a digit is stays in the embedding)."""

    def __init__(self, dim: int):
        super().__init__()
        grid = HARD_SIZE // 8
        self.net = nn.Sequential(nn.Conv2d(3, 32, 4, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 4, 2, 1), nn.GELU(),
                                 nn.Conv2d(64, 64, 4, 2, 1), nn.GELU(), nn.Flatten(), nn.Linear(64 * grid * grid, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def pooled_text(encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The encoder's pooled caption embedding: `text_embeds` (with projection) or `pooler_output`."""
    out = encoder(ids)
    return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output


def clip_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (text, image) rows (both L2-normalised)."""
    logits = logit_scale.exp().clamp(max=100.0) * text @ image.T
    target = torch.arange(len(text), device=text.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def mirror_accuracy(encoder: nn.Module, head: nn.Module, tower: ImageTower, ids: torch.Tensor,
                    images: torch.Tensor) -> float:
    """Share of captions (pairs as `mirrored_pairs` lays them out) closer to their own render than to its mirror."""
    text = F.normalize(head(pooled_text(encoder, ids)), dim=-1)
    image = F.normalize(tower(images), dim=-1)
    own = (text * image).sum(-1)
    mirrored = (text * image.view(-1, 2, image.shape[-1]).flip(1).reshape(image.shape)).sum(-1)
    return float((own > mirrored).float().mean())


def pretrain_text_encoder(encoder: nn.Module, tokenizer: CLIPTokenizer, images8: np.ndarray, labels: np.ndarray,
                          *, steps: int, pairs_per_batch: int = 128, lr: float = 1e-3, scenes: int = 4000,
                          seed: int = 0, device: str = "cpu", progress: ProgressFn | None = None,
                          stage: str = "hard-text", layout: str = "narrow") -> dict:
    """Train `encoder` in place for `steps` CLIP steps; report held-out mirror accuracy before and after."""
    rng = np.random.default_rng(seed + 31)
    images, captions = mirrored_pairs(images8, labels, scenes, rng, layout)
    test_images, test_captions = mirrored_pairs(images8, labels, 500, np.random.default_rng(seed + 32), layout)
    ids, test_ids = token_ids(tokenizer, captions), token_ids(tokenizer, test_captions)
    dim = int(pooled_text(encoder, ids[:1].to(device)).shape[-1])
    torch.manual_seed(seed + 33)
    tower, head = ImageTower(dim).to(device), nn.Linear(dim, dim).to(device)
    logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07)), device=device))
    encoder.to(device).train().requires_grad_(True)
    params = [*encoder.parameters(), *tower.parameters(), *head.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed + 34)
    before = mirror_accuracy(encoder.eval(), head, tower, test_ids.to(device), test_images.to(device))
    encoder.train()
    started, loss = time.time(), torch.tensor(0.0)
    for step in range(1, steps + 1):
        k = torch.randint(0, scenes, (pairs_per_batch,), generator=generator)
        idx = torch.cat([2 * k, 2 * k + 1])  # each scene with its mirror: the hard negatives
        text = F.normalize(head(pooled_text(encoder, ids[idx].to(device))), dim=-1)
        loss = clip_loss(text, F.normalize(tower(images[idx].to(device)), dim=-1), logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(Progress(stage=stage, step=step, total=steps, metrics={"loss": float(loss.detach())}))
    encoder.eval().requires_grad_(False)
    after = mirror_accuracy(encoder, head, tower, test_ids.to(device), test_images.to(device))
    return {"steps": steps, "pairs_per_batch": pairs_per_batch, "lr": lr, "scenes": scenes,
            "final_loss": round(float(loss.detach()), 4), "mirror_accuracy_before": round(before, 4),
            "mirror_accuracy_after": round(after, 4), "seconds": round(time.time() - started, 1)}
