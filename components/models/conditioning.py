"""Text conditioning of the UNet for SD-1.5 and SDXL families, with SDXL's micro-conditioning.

The LCD step (components/distill/lcd.py) needs, per batch, the prompt conditioning c and the
unconditional conditioning (the empty prompt) for classifier-free guidance (Algorithm 1,
line 5). Batches carry either captions, encoded here with the base's text encoder(s), or
precomputed `prompt_embeds` from the latent shards (contract 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """UNet text conditioning of a batch: embeds [B, L, D]; SDXL also pooled [B, P], time ids [B, 6]."""

    embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `UNet2DConditionModel.forward` for this conditioning."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    def cat(self, other: Conditioning) -> Conditioning:
        """[self; other] along the batch (cond and uncond in one teacher forward)."""
        def c(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None else torch.cat([a, b.to(a.dtype)])
        return Conditioning(c(self.embeds, other.embeds), c(self.pooled, other.pooled),
                            c(self.time_ids, other.time_ids))

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Conditioning:
        """On `device`; floating tensors cast to `dtype` when given."""
        def m(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device, dtype if t.is_floating_point() and dtype else t.dtype)
        return Conditioning(m(self.embeds), m(self.pooled), m(self.time_ids))


def sdxl_time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
    """SDXL micro-conditioning add_time_ids = (orig h, w, crop top, left, target h, w); float [B, 6]."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


class TextConditioner:
    """Captions -> Conditioning with the base's text encoder(s), plus the unconditional embedding.

    sd15: last hidden state of the one CLIP encoder; unconditional = the empty prompt.
    sdxl: penultimate hidden states of both encoders concatenated, pooled from the second;
    unconditional = zeros (SDXL's force_zeros_for_empty_prompt), as the SDXL pipeline does.
    """

    def __init__(self, family: str, tokenizers: list[Any], text_encoders: list[Any],
                 uncond_embeds: Tensor | None = None):
        """`uncond_embeds` [1, L, D]: a precomputed empty-prompt embedding (sd15)."""
        if family == "sdxl" and text_encoders and len(text_encoders) != 2:
            raise ValueError("sdxl family needs two text encoders (text_encoder, text_encoder_2)")
        self.family, self.tokenizers, self.text_encoders = family, tokenizers, text_encoders
        self._uncond: Conditioning | None = None if uncond_embeds is None else Conditioning(uncond_embeds)

    @classmethod
    def from_pipeline(cls, pipe: Any, family: str) -> TextConditioner:
        """The conditioner of a loaded diffusers pipeline of `family` (sd15 | sdxl)."""
        if family == "sdxl":
            return cls(family, [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
        return cls(family, [pipe.tokenizer], [pipe.text_encoder])

    def to(self, device: torch.device) -> TextConditioner:
        """Frozen text encoders in eval mode on `device`."""
        for enc in self.text_encoders:
            enc.to(device).requires_grad_(False).eval()
        return self

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor | None]:
        """(prompt_embeds [B, L, D], pooled [B, P] or None)."""
        if not self.text_encoders:
            raise ValueError("the batch has no prompt_embeds and no text encoder is loaded to encode its captions")
        embeds, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            if self.family == "sd15":
                embeds.append(enc(ids)[0])
            else:
                out = enc(ids, output_hidden_states=True)
                embeds.append(out.hidden_states[-2])
                pooled = out[0]  # the last encoder's projected pooled output
        return torch.cat(embeds, dim=-1), pooled

    def unconditional(self, like: Conditioning) -> Conditioning:
        """The empty-prompt conditioning, shaped like `like` (same batch and time ids)."""
        b = like.embeds.shape[0]
        if self.family == "sdxl":
            return Conditioning(torch.zeros_like(like.embeds), torch.zeros_like(like.pooled), like.time_ids)
        if self._uncond is None:
            embeds, _ = self.encode([""])
            self._uncond = Conditioning(embeds)
        return Conditioning(self._uncond.embeds.expand(b, -1, -1).to(like.embeds.device, like.embeds.dtype))

    def conditioning(self, batch: dict[str, Any]) -> Conditioning:
        """The batch's conditioning: the shards' `prompt_embeds` when present, else encoded captions."""
        if "prompt_embeds" in batch and (self.family == "sd15" or "pooled_prompt_embeds" in batch):
            device = self.text_encoders[0].device if self.text_encoders else torch.device("cpu")
            embeds = torch.as_tensor(batch["prompt_embeds"]).float().to(device)
            pooled = batch.get("pooled_prompt_embeds")
            pooled = None if pooled is None else torch.as_tensor(pooled).float().to(device)
        else:
            embeds, pooled = self.encode(batch["captions"])
        time_ids = None
        if self.family == "sdxl":
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
            time_ids = time_ids.to(embeds.device)
        return Conditioning(embeds, pooled, time_ids)
