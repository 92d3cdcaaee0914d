"""The hard toy's UNet trainers resume: a run stopped after one step (its wall-clock budget) and
rerun from its checkpoint ends with the same EMA weights as one uninterrupted run, for the
SD-1.5 family (`last.pt`) and the SDXL family (`sdxl-last.pt`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from components.toy.hard.base import (
    hard_text_encoder,
    hard_tokenizer,
    hard_vae,
    token_ids,
    train_hard_unet,
    trained_seconds,
)
from components.toy.hard.config import HardToyConfig
from components.toy.hard.sdxl import build_untrained_hard_sdxl, train_hard_sdxl_unet
from tests.tiny_pipeline import single_thread

one_thread = pytest.fixture(single_thread)  # a shared 2-core machine: more threads only spin
CAPTIONS = ["a red seven on the left and a blue two on the right", "a green one on the right and a yellow nine on the left"]


def settings(folder: Path, **over) -> HardToyConfig:
    return HardToyConfig(**{"train_steps": 3, "batch_size": 2, "warmup_steps": 1, "eval_every": 100,
                            "caption_dropout": 0.5, "checkpoint_dir": str(folder), **over})


def data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = hard_tokenizer(tmp)
    return torch.randn(n, 4, 16, 16, generator=g), token_ids(tokenizer, [CAPTIONS[i % 2] for i in range(n)])


def sd15_run(folder: Path, **over) -> dict[str, torch.Tensor]:
    latents, ids = data()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = hard_tokenizer(tmp)
    s = settings(folder, **over)
    unet, text, step = train_hard_unet(latents, ids, token_ids(tokenizer, [""]), hard_text_encoder(tokenizer, s.seed), s)
    return {"step": torch.tensor(step), **unet.state_dict(), **{f"text.{k}": v for k, v in text.state_dict().items()}}


def sdxl_run(folder: Path, **over) -> dict[str, torch.Tensor]:
    latents, ids = data()
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(len(latents), 1)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_untrained_hard_sdxl(hard_vae(0), tmp, 0)
    step = train_hard_sdxl_unet(pipe, latents, ids, time_ids, settings(folder, **over))
    return {"step": torch.tensor(step), **pipe.unet.state_dict(),
            **{f"text_2.{k}": v for k, v in pipe.text_encoder_2.state_dict().items()}}


@pytest.mark.parametrize("run", [sd15_run, sdxl_run], ids=["sd15", "sdxl"])
def test_a_stopped_run_resumes_to_the_uninterrupted_weights(run, tmp_path, one_thread):
    whole = run(tmp_path / "whole")
    first = run(tmp_path / "split", budget_s=0.0)  # stops after its first step, checkpointed
    assert int(first["step"]) == 1
    last = next((tmp_path / "split").glob("*last.pt"))
    state = torch.load(last)
    assert 0 < state["trained_s"] < 1000
    torch.save({**state, "trained_s": 1000.0}, last)  # as if the first run had taken 1,000 s
    resumed = run(tmp_path / "split")  # the same folder: resumes from step 1
    assert 1000 < trained_seconds(last) < 1000 + 600  # the resumed run's seconds add to the earlier runs'
    assert int(resumed["step"]) == int(whole["step"]) == 3
    assert whole.keys() == resumed.keys()
    diff = max(float((whole[k].double() - resumed[k].double()).abs().max()) for k in whole)
    assert diff == 0.0, f"resumed weights differ from the uninterrupted run by {diff:.3g}"
    assert any(float((whole[k].double() - first[k].double()).abs().max()) > 0 for k in whole if k != "step")
