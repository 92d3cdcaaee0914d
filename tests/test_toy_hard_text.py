"""CLIP pre-training of the hard toy's text encoders (components/toy/hard/text_pretrain.py), and the
UNet trainers keeping a pre-trained text encoder frozen."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from components.toy.classifier import load_sklearn_digits
from components.toy.hard.base import hard_text_encoder, hard_tokenizer, token_ids, train_hard_unet
from components.toy.hard.config import HardToyConfig
from components.toy.hard.text_pretrain import mirrored_pairs, pretrain_text_encoder
from tests.tiny_pipeline import single_thread

one_thread = pytest.fixture(single_thread)  # a shared 2-core machine: more threads only spin


def tokenizer():
    with tempfile.TemporaryDirectory() as tmp:
        return hard_tokenizer(tmp)


def test_mirrored_pairs_exchange_the_sides():
    images8, labels = load_sklearn_digits()
    images, captions = mirrored_pairs(images8, labels, 3, np.random.default_rng(0))
    assert images.shape == (6, 3, 64, 64)
    for k in range(3):
        scene, mirror = captions[2 * k], captions[2 * k + 1]
        # each names the same two digits and colours, on the other sides
        left = scene.split(" on the left")[0].split(" and ")[-1].removeprefix("a ")
        assert f"{left} on the right" in mirror


def test_pretraining_teaches_the_encoder_which_side_is_which(one_thread):
    images8, labels = load_sklearn_digits()
    tok = tokenizer()
    encoder = hard_text_encoder(tok, 0)
    report = pretrain_text_encoder(encoder, tok, images8, labels, steps=400, pairs_per_batch=64, scenes=1000)
    # before: a random encoder cannot tell a caption's render from its mirror (chance 0.5)
    assert report["mirror_accuracy_before"] <= 0.65
    assert report["mirror_accuracy_after"] >= 0.8, report
    assert not any(p.requires_grad for p in encoder.parameters())  # handed back frozen, in eval mode
    assert not encoder.training


@pytest.mark.parametrize("frozen", [True, False])
def test_unet_trainer_keeps_a_frozen_text_encoder(tmp_path: Path, frozen: bool, one_thread):
    tok = tokenizer()
    ids = token_ids(tok, ["a red seven on the left and a blue two on the right"] * 4)
    s = HardToyConfig(train_steps=3, batch_size=2, warmup_steps=1, eval_every=100, text_frozen=frozen,
                      checkpoint_dir=str(tmp_path))
    encoder = hard_text_encoder(tok, 0)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    _, text, _ = train_hard_unet(torch.randn(4, 4, 16, 16), ids, token_ids(tok, [""]), encoder, s)
    unchanged = all(torch.equal(before[k], v) for k, v in text.state_dict().items())
    assert unchanged is frozen


def test_a_resumed_base_run_loads_the_pretrained_text_encoder(tmp_path: Path, monkeypatch, one_thread):
    """`world.pretrain_text` keeps its result in checkpoint_dir: the same settings load it (no second
    pre-training, the same weights), other settings train afresh."""
    from components.toy.hard import world

    images8, labels = load_sklearn_digits()
    tok = tokenizer()
    s = HardToyConfig(text_pretrain_steps=2, text_pretrain_pairs=4, checkpoint_dir=str(tmp_path))
    first = hard_text_encoder(tok, 0)
    report = world.pretrain_text(first, tok, images8, labels, s)
    assert report["steps"] == 2 and (tmp_path / "text-sd15.pt").is_file()

    calls = []
    real = world.pretrain_text_encoder
    monkeypatch.setattr(world, "pretrain_text_encoder", lambda *a, **k: calls.append(k) or real(*a, **k))
    again = hard_text_encoder(tok, 0)
    resumed = world.pretrain_text(again, tok, images8, labels, s)
    assert calls == [] and resumed["resumed_from"] == str(tmp_path / "text-sd15.pt")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert not any(p.requires_grad for p in again.parameters())

    other = world.pretrain_text(hard_text_encoder(tok, 0), tok, images8, labels, s.model_copy(update={"text_pretrain_steps": 3}))
    assert len(calls) == 1 and other["steps"] == 3 and "resumed_from" not in other

    # an encoder of another shape with the same settings (the SDXL family's, same folder) never loads it
    from transformers import CLIPTextConfig, CLIPTextModel

    small = CLIPTextModel(CLIPTextConfig(**{**first.config.to_dict(), "hidden_size": 16, "intermediate_size": 32,
                                            "projection_dim": 16}))
    s3 = s.model_copy(update={"text_pretrain_steps": 3})
    smaller = world.pretrain_text(small, tok, images8, labels, s3)
    assert len(calls) == 2 and "resumed_from" not in smaller
