"""The LoRA factor type both LoRA reading (`lora_io`) and merging (`merge`) work on.

A LoRA module is delta W = scale * B @ A (LCM-LoRA report eq. 1, scale = alpha / r). Reading
turns a file of any format into these factors; the merge algebra combines them; writing turns
them back into files. `peft_state_dict` is their diffusers/peft key form, which both sides
need: reading hands it to diffusers when a file's own alphas would be lost, writing saves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # pipeline attributes a LoRA may touch


@dataclass(frozen=True)
class LoraFactor:
    """One LoRA module: delta W = scale * B @ A (report eq. 1 with scale = alpha / r).

    down: A, r x in (Linear) or r x in x kh x kw (Conv2d); up: B, out x r (x 1 x 1).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """scale * B @ A, shaped like the base weight (out x in or out x in x kh x kw)."""
        product = self.up.flatten(1).double() @ self.down.flatten(1).double()
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (self.scale * product).reshape(shape)


LoraFactors = dict[str, dict[str, LoraFactor]]  # component ("unet", "text_encoder", ...) -> module -> factor


def module_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    """The shape of a module's weight (out x in [x kh x kw]), or None for a module without one."""
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else None



def peft_state_dict(factors: LoraFactors, *, text_model_prefix: bool = True) -> dict[str, torch.Tensor]:
    """diffusers/peft keys (`unet.<module>.lora_A.weight`) with each scale folded into B.

    Folding makes alpha = rank for every module, which is what diffusers assumes for a file
    without alphas, so the file loads at the right strength with any loader.
    `text_model_prefix` writes CLIP keys as `text_model.encoder...` (older transformers layout,
    which diffusers strips when the text encoder is flattened).
    """
    out: dict[str, torch.Tensor] = {}
    for component, modules in factors.items():
        for name, f in modules.items():
            if component != "unet" and text_model_prefix and not name.startswith("text_model."):
                name = f"text_model.{name}"
            out[f"{component}.{name}.lora_A.weight"] = f.down.contiguous()
            out[f"{component}.{name}.lora_B.weight"] = (f.scale * f.up).contiguous()
    return out
