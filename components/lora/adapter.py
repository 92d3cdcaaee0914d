"""LoRA on the UNet (report, eq. 1: h = W0 x + B A x, scaled by alpha / r), through peft.

The student is the base UNet with a peft LoRA adapter; the teacher is the same UNet with its
adapters disabled (`adapters_disabled`), so one copy of the base weights serves both.
`meta_unet` builds a real-size UNet from a bundled config on the meta device, which is
enough to count trainable parameters (`--dry-run`) without any weights.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ADAPTER_NAME = "default"


def lora_config(rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0):
    """peft LoraConfig for the UNet: rank r, alpha (scale alpha / r), the module names that get LoRA."""
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"distill.lora_rank={rank}: must be a positive integer")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                      init_lora_weights=True)


def add_lora(unet: torch.nn.Module, config, adapter_name: str = ADAPTER_NAME) -> torch.nn.Module:
    """Freeze the base UNet and inject the LoRA adapter (only A and B train; B starts at zero)."""
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=adapter_name)
    injected = [n for n, _ in unet.named_parameters() if ".lora_A." in n]
    if not injected:
        raise ValueError(
            f"distill.target_modules={list(config.target_modules)}: no module of the UNet matched; "
            "use diffusers module names such as to_q, to_k, to_v, to_out.0, conv1"
        )
    return unet


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters (A and B of every adapted module)."""
    return [p for n, p in unet.named_parameters() if p.requires_grad and ".lora_" in n]


def trainable_parameters(module: torch.nn.Module) -> int:
    """Number of parameters with requires_grad (the LoRA parameters after `add_lora`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def cast_lora_to_fp32(unet: torch.nn.Module) -> None:
    """Keep trainable LoRA weights in fp32 when the frozen base is stored in bf16/fp16."""
    for p in lora_parameters(unet):
        p.data = p.data.float()


@contextlib.contextmanager
def adapters_disabled(unet: Any) -> Iterator[Any]:
    """Context in which `unet` runs as the teacher: the base weights alone, LoRA branches off."""
    if not getattr(unet, "_hf_peft_config_loaded", False):  # no adapter: it is the base already
        yield unet
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def unet_config(folder: str | Path) -> dict[str, Any]:
    """The UNet config of a diffusers folder (`FOLDER/unet/config.json`), e.g. data/arch/sd15."""
    path = Path(folder) / "unet" / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no UNet config; pass a diffusers folder such as data/arch/sd15")
    return json.loads(path.read_text())


def meta_unet(config: dict[str, Any]) -> torch.nn.Module:
    """A real-size UNet2DConditionModel from its config on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def count_lora_parameters(config: dict[str, Any], rank: int, alpha: float, target_modules: list[str]) -> int:
    """Trainable LoRA parameters of the UNet described by `config` (Table 1 of the report)."""
    unet = meta_unet(config)
    with torch.device("meta"):
        add_lora(unet, lora_config(rank, alpha, target_modules))
    return trainable_parameters(unet)


def unet_lora_state_dict(unet: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """peft keys `MODULE.lora_A.weight` / `MODULE.lora_B.weight`, fp32 CPU copies, for `lora_formats.save_lora`."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
