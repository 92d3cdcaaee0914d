"""Every ```python block of every model card lcmlora writes compiles as written (components/lora/model_card.py).

The cards come from each function that writes one: render_model_card for a hub-id base, a local base and
a merged style variant (with the arguments components/stages/merge.py passes), the distill artifact
(components/distill/artifact.py, written in a tmp folder) and the card the registry generates for a
folder without one (components/registry/folder.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from components.distill.artifact import write_distill_artifact
from components.lora.model_card import render_model_card
from components.registry.folder import model_card
from components.stages.merge import CARD_TAGS

HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
LOCAL = "data/toy/base"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(card: str) -> list[str]:
    return FENCE.findall(card)


def distill_card(tmp_path: Path, base_meta: dict) -> str:
    """README.md as write_distill_artifact writes it, for a one-module LoRA."""
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = {f"{module}.lora_A.weight": torch.zeros(4, 8), f"{module}.lora_B.weight": torch.zeros(8, 4)}
    metrics = {"steps": 2, "final_loss_mean20": 0.5}
    write_distill_artifact(tmp_path / "art", lora_state_dict=lora, rank=4, alpha=4, base_meta=base_meta,
                           metrics=metrics, lineage={"stage": "distill"}, config_yaml="distill: {}\n",
                           loss_rows=[{"step": 1, "loss": 1.0, "loss_mean20": 1.0}])
    return (tmp_path / "art" / "README.md").read_text()


MERGE_ARGS = {"title": "merged-0.8_1", "tags": CARD_TAGS, "num_inference_steps": 4, "guidance_scale": 1.0,
              "body": "\nStyle LoRA `s` x 0.8 + LCM-LoRA x 1.\n", "extra": {"merge": {"l1": 0.8, "l2": 1.0}},
              "relation": "merge"}  # as components/stages/merge.py passes them
SD15 = "runwayml/stable-diffusion-v1-5"
CARDS = {  # kind: (the card, the base its snippet should load: a hub id, or None for a placeholder)
    "hub base": (lambda tmp: render_model_card(base_model=HUB_ID, title="sdxl-lcm-lora"), HUB_ID),
    "local base": (lambda tmp: render_model_card(base_model=LOCAL, title="toy-lcm-lora"), None),
    "local base, hub_id": (lambda tmp: render_model_card(base_model="/models/my-ft", hub_id=HUB_ID, title="t"),
                           HUB_ID),
    "no base": (lambda tmp: render_model_card(base_model=None, title="t"), None),
    "merged, hub base": (lambda tmp: render_model_card(base_model=SD15, **MERGE_ARGS), SD15),
    "merged, local base": (lambda tmp: render_model_card(base_model=LOCAL, **MERGE_ARGS), None),
    "distill, local base": (lambda tmp: distill_card(tmp, {"name": "toy", "reference": LOCAL, "family": "sd15"}),
                            None),
    "distill, hub_id": (lambda tmp: distill_card(tmp, {"name": "sdxl", "reference": "/models/sdxl", "family": "sdxl",
                                                       "hub_id": HUB_ID, "license": "openrail++"}), HUB_ID),
    "registry, local base": (lambda tmp: model_card(tmp, "gen", {"reference": LOCAL, "family": "sd15"}).decode(),
                             None),
    "registry, hub base": (lambda tmp: model_card(tmp, "gen", {"reference": HUB_ID, "family": "sdxl"}).decode(),
                           HUB_ID),
}


@pytest.mark.parametrize("kind", list(CARDS))
def test_every_python_block_of_a_card_compiles(kind: str, tmp_path: Path) -> None:
    make, base = CARDS[kind]
    blocks = python_blocks(make(tmp_path))
    assert blocks, f"{kind}: the card has no ```python usage block"
    for code in blocks:
        compile(code, "card", "exec")  # a SyntaxError here names the card's line
        loads = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Attribute) and n.func.attr == "from_pretrained"]
        assert len(loads) == 1 and len(loads[0].args) == 1, code
        [arg] = loads[0].args
        assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), ast.unparse(loads[0])
        if base is not None:
            assert arg.value == base, ast.unparse(loads[0])
