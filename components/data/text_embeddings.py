"""Prompt embeddings with a base's own text encoder(s), stored beside the latents (encode.text_embeddings).

`pipeline_text_embedder` builds the captions -> embeddings function encode calls per batch;
`text_encoder_fingerprint` names the text encoder(s) in the latent folder and the cache keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

TextEmbedder = Callable[[list[str]], dict[str, np.ndarray]]  # captions -> {"emb": BxLxD, ["pooled": BxD]}


def pipeline_text_embedder(pipe: Any, family: str, device: str = "cpu") -> TextEmbedder:
    """Captions -> prompt embeddings with the base's own text encoder(s) (no CFG pass).

    sd15: `emb` (B x 77 x D). sdxl: `emb` (both encoders' hidden states, concatenated) and
    `pooled` (B x D2), as `StableDiffusionXLPipeline.encode_prompt` builds them.
    """

    @torch.no_grad()
    def embed(captions: list[str]) -> dict[str, np.ndarray]:
        if family == "sdxl":
            emb, _, pooled, _ = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
            return {"emb": emb.float().cpu().numpy(), "pooled": pooled.float().cpu().numpy()}
        emb, _ = pipe.encode_prompt(captions, device, 1, False)
        return {"emb": emb.float().cpu().numpy()}

    return embed


def text_encoder_fingerprint(fingerprints: dict[str, str]) -> str:
    """One fingerprint for the text encoder(s) of a base (both of them for SDXL)."""
    parts = [fingerprints["text_encoder"]] + ([fingerprints["text_encoder_2"]] if "text_encoder_2" in fingerprints else [])
    return parts[0] if len(parts) == 1 else hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
