"""The CLI's shared options: `--base` defaults to the only base in params, never to the toy by name."""

from __future__ import annotations

import click
import pytest

from components.config import load_params
from flows.cli_common import pick_base

TWO_BASES = ['bases.ft={"reference": "data/toy/base", "family": "sd15"}']


def test_the_only_base_is_the_default() -> None:
    cfg = load_params("params.yaml", ['bases={"mine": {"reference": "data/toy/base", "family": "sd15"}}'])
    assert pick_base(cfg, None) == "mine"


def test_several_bases_need_base_naming_them() -> None:
    cfg = load_params("params.yaml", TWO_BASES)
    with pytest.raises(click.UsageError, match=r"--base is required: params defines 2 bases \(ft, toy\)"):
        pick_base(cfg, None)
    assert pick_base(cfg, "ft") == "ft"


def test_known_library_noise_is_dropped_at_the_edge_only(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from flows.cli_common import quiet_known_noise

    logger = logging.getLogger("diffusers.loaders.lora_base")
    logger.propagate, logger.disabled = True, False
    from flows.cli_common import _DropContaining

    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter per logger and text
    ours = [f for f in logger.filters if isinstance(f, _DropContaining)]
    assert len(ours) == 1, logger.filters
    with caplog.at_level(logging.WARNING, logger="diffusers.loaders.lora_base"):
        logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
