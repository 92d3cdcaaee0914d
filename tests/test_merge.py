"""components/lora/merge.py: the style-LoRA merge variants on tiny random pipelines (seconds on CPU).

Variant 2 (exact merged LoRA) and variant 3 (fused base) are compared with variant 1 (diffusers
runtime adapters) on UNet and text-encoder outputs; SVD compression; both written formats.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from components.lora import io as lora_io
from components.lora import merge
from components.lora.factors import LoraFactors, peft_state_dict
from tests.tiny_merge_pipelines import (
    WEIGHTS,
    make_loras,
    outputs,
    runtime_pipe,
    tiny_sd15,
    tiny_sdxl,
)


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    return make_loras(tmp_path_factory.mktemp("loras"))


def merged_factors(style: Path, lcm: Path, weights=WEIGHTS) -> LoraFactors:
    probe = tiny_sd15()
    style_f = lora_io.read_factors(probe, "sd15", style)
    lcm_f = lora_io.read_factors(probe, "sd15", lcm)
    return merge.concat_ranks([(weights[0], style_f), (weights[1], lcm_f)])


def test_merged_lora_equals_runtime_adapters(loras, tmp_path):
    reference = outputs(runtime_pipe(loras["style_peft"], loras["lcm"]))
    factors = merged_factors(loras["style_peft"], loras["lcm"])
    assert factors["unet"]["down_blocks.0.attentions.0.proj_in"].rank == 4 + 8  # ranks concatenated
    assert "text_encoder" in factors  # the style's text-encoder layers are kept
    file = tmp_path / "merged.safetensors"
    save_file(peft_state_dict(factors), str(file))
    pipe = tiny_sd15()
    lora_io.load_adapter(pipe, "sd15", file, "merged")
    hidden, eps = outputs(pipe)
    bare_hidden, bare_eps = outputs(tiny_sd15())
    # the style's text-encoder layers act in both pipelines: the hidden states are not compared
    # between two bare text encoders (fails when text-encoder layers are dropped or zeroed)
    assert (reference[0] - bare_hidden).abs().max().item() > 1e-3
    assert (hidden - bare_hidden).abs().max().item() > 1e-3
    assert (hidden - reference[0]).abs().max().item() < 1e-5
    assert (eps - reference[1]).abs().max().item() < 1e-5
    # and the LoRA changes the output: the comparison is not between two bare bases
    assert (eps - bare_eps).abs().max().item() > 1e-3



def test_fused_checkpoint_equals_runtime_adapters(loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    reference = outputs(runtime_pipe(loras["style_peft"], loras["lcm"]))
    pipe = tiny_sd15()
    merge.fuse_into(pipe, merged_factors(loras["style_peft"], loras["lcm"]))
    pipe.save_pretrained(tmp_path / "fused", safe_serialization=True)
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "fused", safety_checker=None, tokenizer=None,
                                                       feature_extractor=None)
    single = merge.save_single_file(pipe, tmp_path / "fused.safetensors", "sd15")
    from_single = StableDiffusionPipeline.from_single_file(str(single), config=str(tmp_path / "fused"), tokenizer=None,
                                                           safety_checker=None, requires_safety_checker=False)
    for got in (outputs(pipe), outputs(reloaded), outputs(from_single)):
        assert (got[0] - reference[0]).abs().max().item() < 1e-4
        assert (got[1] - reference[1]).abs().max().item() < 1e-4



def test_svd_compression_is_exact_at_full_rank_and_optimal_below(loras):
    factors = merged_factors(loras["style_peft"], loras["lcm"])
    full, errors = merge.svd_compress(factors, rank=64)
    assert max(errors.values()) < 1e-6
    assert merge.overall_relative_error(factors, full) < 1e-6
    low, errors = merge.svd_compress(factors, rank=2)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    singular = torch.linalg.svdvals(factors["unet"][name].delta().flatten(1))
    expected = float((singular[2:].square().sum() / singular.square().sum()).sqrt())
    assert errors[f"unet.{name}"] == pytest.approx(expected, rel=1e-5)
    assert low["unet"][name].rank == 2



def test_saved_folder_round_trips_in_both_formats_with_alpha_not_rank(loras, tmp_path):
    """Style factors (alpha 2, rank 4) and the merged LoRA written in peft and kohya format read back exactly."""
    probe = tiny_sd15()
    style = lora_io.read_factors(probe, "sd15", loras["style_peft"])
    merged = merged_factors(loras["style_peft"], loras["lcm"])
    for label, factors in (("style", style), ("merged", merged)):
        paths = merge.save_lora_folder(tmp_path / label, factors, family="sd15", base_meta={"name": "tiny"},
                                       title=label, description="test")
        for fmt in ("diffusers", "kohya"):
            back = lora_io.read_factors(probe, "sd15", paths[fmt])
            assert back.keys() == factors.keys(), fmt
            for component, modules in factors.items():
                assert back[component].keys() == modules.keys(), (fmt, component)
                for name, f in modules.items():
                    torch.testing.assert_close(back[component][name].delta(), f.delta(), atol=1e-7, rtol=0)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "style" / "lora_kohya.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        alpha = f.get_tensor(next(k for k in keys if k.startswith("lora_unet_") and k.endswith(".alpha")))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert float(alpha) == pytest.approx(2.0)  # alpha kept, not rewritten to the rank


# --- SDXL family: kohya file with SGM block names and both text encoders -----------------


def sdxl_outputs(pipe, seed: int = 0) -> torch.Tensor:
    """The tiny SDXL UNet's prediction from both text encoders' states and the pooled embedding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 8), generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = pipe.text_encoder_2(ids, output_hidden_states=True)
        hidden = torch.cat([first, second.hidden_states[-2]], dim=-1)
        cond = {"text_embeds": second.text_embeds, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
        return pipe.unet(latents, torch.tensor([999, 499]), encoder_hidden_states=hidden,
                         added_cond_kwargs=cond).sample


def test_sdxl_kohya_sgm_names_with_both_text_encoders(tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from components.models.ldm_layout import unet_key_to_ldm

    # 1. A kohya SDXL style LoRA named as kohya's SDXL trainer names it (input_blocks_4_1_...).
    pipe = tiny_sdxl()
    torch.manual_seed(3)
    kohya = {}
    config = dict(pipe.unet.config)
    for component, modules, prefix in ((pipe.unet, ["to_q", "to_k", "proj_in", "conv1", "ff.net.2"], "lora_unet"),
                                       (pipe.text_encoder, ["q_proj", "fc1"], "lora_te1"),
                                       (pipe.text_encoder_2, ["v_proj"], "lora_te2")):
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=modules, init_lora_weights=False),
                                component, adapter_name="rand")
        for key, value in get_peft_model_state_dict(component, adapter_name="rand").items():
            module, kind = key.split(".lora_")
            if prefix == "lora_unet":
                module = unet_key_to_ldm(f"{module}.weight", config).removesuffix(".weight")
            elif not module.startswith("text_model."):
                module = f"text_model.{module}"
            name = f"{prefix}_{module.replace('.', '_')}"
            kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = 0.3 * value.contiguous()
            kohya[f"{name}.alpha"] = torch.tensor(2.0)
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)
    save_file(kohya, str(tmp_path / "style_sdxl.safetensors"))
    lcm_sd = {}
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_v", "conv2"],
                                       init_lora_weights=False), pipe.unet, adapter_name="lcm_rand")
    for key, value in get_peft_model_state_dict(pipe.unet, adapter_name="lcm_rand").items():
        lcm_sd[f"unet.{key}"] = 0.2 * value
    save_file(lcm_sd, str(tmp_path / "lcm_sdxl.safetensors"))
    style, lcm = tmp_path / "style_sdxl.safetensors", tmp_path / "lcm_sdxl.safetensors"
    # 2. Variant 1 against variant 2.
    runtime = tiny_sdxl()
    counts = lora_io.load_adapter(runtime, "sdxl", style, "style")
    assert counts["text_encoder"] > 0 and counts["text_encoder_2"] > 0  # both encoders applied
    lora_io.load_adapter(runtime, "sdxl", lcm, "lcm")
    lora_io.set_weights(runtime, {"style": WEIGHTS[0], "lcm": WEIGHTS[1]})
    reference = sdxl_outputs(runtime)
    probe = tiny_sdxl()
    merged = merge.concat_ranks([(WEIGHTS[0], lora_io.read_factors(probe, "sdxl", style)),
                                 (WEIGHTS[1], lora_io.read_factors(probe, "sdxl", lcm))])
    paths = merge.save_lora_folder(tmp_path / "merged", merged, family="sdxl", base_meta={"name": "tiny-sdxl"},
                                   title="m", description="d")
    for fmt in ("diffusers", "kohya"):
        single = tiny_sdxl()
        lora_io.load_adapter(single, "sdxl", paths[fmt], "merged")
        assert (sdxl_outputs(single) - reference).abs().max().item() < 1e-5, fmt
    assert (reference - sdxl_outputs(tiny_sdxl())).abs().max().item() > 1e-3
    # 3. The SD-1.5 base refuses it, naming the second text encoder.
    with pytest.raises(lora_io.WrongFamily, match="text_encoder_2"):
        lora_io.load_adapter(tiny_sd15(), "sd15", style, "style")
