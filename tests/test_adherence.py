"""Prompt adherence: CLIP score from a local checkpoint against a reference (the toy's digit
accuracy is tested in test_judges.py)."""

from __future__ import annotations

import pytest
import torch

from components.evaluate.adherence import (
    clip_score_from_embeddings,
    clip_score_metric,
    to_uint8_hwc,
)
from tests.tiny_pipeline import tiny_clip_folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return (folder, *tiny_clip_folder(folder))


def test_clip_score_matches_a_direct_computation(tiny_clip):
    folder, model, processor = tiny_clip
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    prompts = ["a red car", "a blue sky", "digit seven", "a cat"]
    score = clip_score_metric(folder, batch_size=3)(images, prompts)
    # Reference: the CLIP towers and projections called by hand, cosine * 100 clipped at 0, mean.
    with torch.no_grad():
        pix = processor(images=to_uint8_hwc(images), return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        tok = processor.tokenizer(prompts, return_tensors="pt", padding=True)
        txt = model.text_projection(model.text_model(**tok).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert score == pytest.approx(float((100 * cos).clamp(min=0).mean()), abs=1e-4)
    assert clip_score_from_embeddings(img, img) == pytest.approx(100.0)


def test_missing_clip_checkpoint_names_the_params_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate.clip_model is not set"):
        clip_score_metric(None)
    with pytest.raises(FileNotFoundError, match="evaluate.clip_model=.*not a CLIP folder"):
        clip_score_metric(tmp_path)
