"""Text conditioning (components/models/conditioning.py): SD-1.5 / SDXL embeddings, unconditional, micro-conditioning."""

from __future__ import annotations

import pytest
import torch

from components.models.conditioning import Conditioning, TextConditioner, sdxl_time_ids
from tests.tiny_models import tiny_pipeline

CAPTIONS = ["a handwritten digit one", "a handwritten digit seven", "a handwritten digit nine"]


def sdxl_batch(b: int = 3) -> dict:
    return {"captions": CAPTIONS[:b], "original_size": torch.tensor([[64, 48]] * b),
            "crop_top_left": torch.tensor([[3, 5]] * b), "target_size": torch.tensor([[32, 32]] * b)}


def test_sdxl_time_ids_are_original_crop_target_in_order():
    ids = sdxl_time_ids(torch.tensor([[64, 48]]), torch.tensor([[3, 5]]), torch.tensor([[32, 30]]))
    assert ids.dtype == torch.float32
    assert ids.tolist() == [[64.0, 48.0, 3.0, 5.0, 32.0, 30.0]]


def test_conditioning_kwargs_cat_and_to():
    sd15 = Conditioning(torch.ones(2, 3, 4))
    assert set(sd15.unet_kwargs()) == {"encoder_hidden_states"}
    xl = Conditioning(torch.ones(2, 3, 4), torch.ones(2, 5), torch.ones(2, 6))
    kwargs = xl.unet_kwargs()
    assert kwargs["added_cond_kwargs"]["text_embeds"] is xl.pooled and kwargs["added_cond_kwargs"]["time_ids"] is xl.time_ids

    other = Conditioning(torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 5), torch.zeros(2, 6))
    both = xl.cat(other)
    assert both.embeds.shape == (4, 3, 4) and both.embeds.dtype == torch.float32  # other's dtype follows self
    assert both.embeds[:2].eq(1).all() and both.embeds[2:].eq(0).all()
    assert both.pooled.shape == (4, 5) and both.time_ids.shape == (4, 6)
    assert sd15.cat(Conditioning(torch.zeros(1, 3, 4))).pooled is None

    half = Conditioning(torch.ones(1, 2), None, torch.ones(1, 6, dtype=torch.long)).to(torch.device("cpu"), torch.bfloat16)
    assert half.embeds.dtype == torch.bfloat16 and half.pooled is None
    assert half.time_ids.dtype == torch.long  # only floating tensors change dtype


def test_sd15_encodes_captions_and_empty_prompt_unconditional(tmp_path):
    pipe = tiny_pipeline("sd15", tmp_path / "pipe")
    conditioner = TextConditioner.from_pipeline(pipe, "sd15").to(torch.device("cpu"))
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    cond = conditioner.conditioning({"captions": CAPTIONS})
    ids = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder(ids)[0]  # the last hidden state
    assert torch.equal(cond.embeds, expected)
    assert cond.pooled is None and cond.time_ids is None
    uncond = conditioner.unconditional(cond)
    empty, _ = conditioner.encode([""])
    assert uncond.embeds.shape == cond.embeds.shape
    assert all(torch.equal(uncond.embeds[i], empty[0]) for i in range(3))
    assert not torch.equal(uncond.embeds[0], cond.embeds[0])


def test_sd15_precomputed_embeddings_need_no_text_encoder():
    embeds = torch.randn(2, 5, 8, dtype=torch.float64)
    uncond = torch.randn(1, 5, 8)
    conditioner = TextConditioner("sd15", [], [], uncond_embeds=uncond)
    cond = conditioner.conditioning({"prompt_embeds": embeds, "captions": ["ignored", "ignored"]})
    assert cond.embeds.dtype == torch.float32 and torch.allclose(cond.embeds, embeds.float())
    assert torch.equal(conditioner.unconditional(cond).embeds, uncond.expand(2, -1, -1))
    with pytest.raises(ValueError, match="no text encoder"):
        conditioner.conditioning({"captions": ["a digit"]})


def test_sdxl_two_encoders_pooled_time_ids_and_zero_unconditional(tmp_path):
    pipe = tiny_pipeline("sdxl", tmp_path / "pipe")
    conditioner = TextConditioner.from_pipeline(pipe, "sdxl")
    batch = sdxl_batch()
    cond = conditioner.conditioning(batch)
    ids = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        one = pipe.text_encoder(ids, output_hidden_states=True)
        two = pipe.text_encoder_2(ids, output_hidden_states=True)
    # penultimate hidden states of both encoders side by side; pooled = the second's projection
    assert torch.equal(cond.embeds, torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1))
    assert torch.equal(cond.pooled, two[0])
    assert cond.time_ids.tolist() == [[64.0, 48.0, 3.0, 5.0, 32.0, 32.0]] * 3
    uncond = conditioner.unconditional(cond)
    assert uncond.embeds.eq(0).all() and uncond.pooled.eq(0).all()  # force_zeros_for_empty_prompt
    assert uncond.time_ids is cond.time_ids

    pre = TextConditioner("sdxl", [], [])
    given = pre.conditioning({**batch, "prompt_embeds": cond.embeds, "pooled_prompt_embeds": cond.pooled})
    assert torch.equal(given.embeds, cond.embeds) and torch.equal(given.pooled, cond.pooled)
    with pytest.raises(ValueError, match="two text encoders"):
        TextConditioner("sdxl", [pipe.tokenizer], [pipe.text_encoder])
