"""LoRA on the UNet (components/lora/adapter.py): injection, teacher via disabled adapters, counts, state dicts."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from components.config import DistillConfig
from components.lora.adapter import (
    adapters_disabled,
    add_lora,
    cast_lora_to_fp32,
    count_lora_parameters,
    lora_config,
    lora_parameters,
    meta_unet,
    trainable_parameters,
    unet_config,
    unet_lora_state_dict,
)
from tests.tiny_models import tiny_unet_config, unet_inputs

TARGETS = DistillConfig().target_modules


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config("sd15")).eval()


def randomise_lora_b(unet: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1


@torch.no_grad()
def forward(unet: torch.nn.Module) -> torch.Tensor:
    return unet(**unet_inputs(unet)).sample


def test_add_lora_freezes_base_and_starts_as_the_base():
    unet = tiny_unet()
    base_out = forward(unet)
    add_lora(unet, lora_config(4, 8, TARGETS))
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora_parameters(unet)) == len(trainable)
    assert trainable_parameters(unet) == sum(p.numel() for p in lora_parameters(unet))
    assert torch.equal(forward(unet), base_out)  # B = 0 at init: the student starts as the teacher
    scale = {m.scaling["default"] for m in unet.modules() if hasattr(m, "scaling") and "default" in m.scaling}
    assert scale == {8 / 4}  # alpha / r


def test_adapters_disabled_is_the_base_and_restores_the_student():
    unet = tiny_unet()
    base_out = forward(unet)
    add_lora(unet, lora_config(4, 8, TARGETS))
    randomise_lora_b(unet)
    student_out = forward(unet)
    assert not torch.allclose(student_out, base_out, atol=1e-4)
    with adapters_disabled(unet) as teacher:
        assert teacher is unet
        assert torch.allclose(forward(unet), base_out, atol=1e-6)
    assert torch.equal(forward(unet), student_out)  # adapters back on
    with pytest.raises(RuntimeError, match="boom"), adapters_disabled(unet):
        raise RuntimeError("boom")
    assert torch.equal(forward(unet), student_out)  # re-enabled after an error too

    plain = tiny_unet()
    with adapters_disabled(plain) as same:  # no adapter: it is the base already
        assert same is plain and torch.equal(forward(plain), base_out)


def test_bad_settings_fail_with_the_params_key():
    with pytest.raises(ValueError, match="distill.lora_rank=0"):
        lora_config(0, 8, TARGETS)
    # peft itself refuses a target list that matches nothing (before add_lora's own check can).
    with pytest.raises(ValueError, match="no_such_module"):
        add_lora(tiny_unet(), lora_config(4, 8, ["no_such_module"]))


def test_count_on_meta_device_matches_a_real_injection_and_is_linear_in_rank(tmp_path):
    config = tiny_unet_config("sd15")
    assert next(meta_unet(config).parameters()).device.type == "meta"
    real = trainable_parameters(add_lora(tiny_unet(), lora_config(4, 8, TARGETS)))
    assert count_lora_parameters(config, 4, 8, TARGETS) == real
    assert count_lora_parameters(config, 8, 8, TARGETS) == 2 * real
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    assert unet_config(tmp_path)["block_out_channels"] == [16, 32]
    with pytest.raises(FileNotFoundError, match="no UNet config"):
        unet_config(tmp_path / "missing")


def test_state_dict_is_peft_keyed_fp32_cpu_and_cast_keeps_lora_fp32():
    unet = add_lora(tiny_unet(), lora_config(4, 8, TARGETS))
    randomise_lora_b(unet)
    unet.to(dtype=torch.bfloat16)
    cast_lora_to_fp32(unet)
    assert all(p.dtype == torch.float32 for p in lora_parameters(unet))
    assert unet.conv_in.weight.dtype == torch.bfloat16  # the frozen base stays in half precision
    sd = unet_lora_state_dict(unet)
    assert len(sd) == len(lora_parameters(unet))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) and "default" not in k for k in sd)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous() for v in sd.values())
    named = dict(unet.named_parameters())
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    module = key.removesuffix(".lora_B.weight")
    assert torch.equal(sd[key], named[f"{module}.lora_B.default.weight"])
