"""The original single-file layout: diffusers' own `from_single_file` gives back every tensor exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from components.models.ldm_layout import LayoutError, pipeline_to_ldm, unet_key_to_ldm
from tests.tiny_merge_pipelines import tiny_sd15, tiny_sdxl


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_from_single_file_loads_every_tensor_back(tmp_path, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = tiny_sdxl() if family == "sdxl" else tiny_sd15()
    pipe.save_pretrained(tmp_path / "base", safe_serialization=True)
    file = tmp_path / "single.safetensors"
    state = pipeline_to_ldm(pipe, family)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
               for k in state)
    save_file(state, str(file))
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {"tokenizer": None, **({"tokenizer_2": None} if family == "sdxl" else
                                   {"safety_checker": None, "requires_safety_checker": False})}
    back = cls.from_single_file(str(file), config=str(tmp_path / "base"), **extra)
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in components:
        want, got = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
        assert set(want) <= set(got), (name, sorted(set(want) - set(got))[:3])
        for key, value in want.items():
            assert torch.equal(value, got[key]), (name, key)


def test_unknown_unet_key_is_named():
    with pytest.raises(LayoutError, match="controlnet_cond_embedding"):
        unet_key_to_ldm("controlnet_cond_embedding.conv_in.weight", {"layers_per_block": 2, "up_block_types": []})
