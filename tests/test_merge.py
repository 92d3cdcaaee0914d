"""Style-LoRA merge variants on tiny random pipelines (seconds on CPU).

Variant 2 (exact merged LoRA) and variant 3 (fused base) are compared with variant 1 (diffusers
runtime adapters) on UNet and text-encoder outputs; kohya alphas; every incompatible input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from components import merge
from components.base_model import PickleRefused
from tests.tiny_merge_pipelines import tiny_sd15, tiny_sdxl

WEIGHTS = (0.8, 1.0)  # (l1, l2), the report's choice


def random_lora(pipe, *, rank: int, alpha: float, unet_modules: list[str], te_modules: list[str] | None = None,
                seed: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random non-zero peft LoRA state dicts (unet, text encoder) with the given rank and alpha."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    out = []
    for model, modules in ((pipe.unet, unet_modules), (pipe.text_encoder, te_modules)):
        if not modules:
            out.append({})
            continue
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, init_lora_weights=False)
        inject_adapter_in_model(config, model, adapter_name="rand")
        state = {k: 0.2 * v for k, v in get_peft_model_state_dict(model, adapter_name="rand").items()}
        out.append(state)
    return out[0], out[1]


def write_peft(path: Path, unet_sd: dict, te_sd: dict, rank: int, alpha: float) -> Path:
    """A diffusers/peft-format file with lora_alpha in its metadata (as save_lora_weights writes it)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    def meta(sd):
        modules = sorted({k.split(".lora_")[0] for k in sd})
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules).to_dict()

    path.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        str(path), unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd or None,
        unet_lora_adapter_metadata=meta(unet_sd), text_encoder_lora_adapter_metadata=meta(te_sd) if te_sd else None)
    return path / merge.LORA_WEIGHT_NAME


def write_kohya(path: Path, unet_sd: dict, te_sd: dict, alpha: float) -> Path:
    """A kohya-format file (lora_unet_* / lora_te_*, per-module alpha), as A1111 and ComfyUI read it."""
    out = {}
    for prefix, sd in (("lora_unet_", unet_sd), ("lora_te_", te_sd)):
        for key, value in sd.items():
            module, kind = key.split(".lora_")
            if prefix == "lora_te_" and not module.startswith("text_model."):
                module = f"text_model.{module}"
            name = prefix + module.replace(".", "_")
            out[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(path))
    return path


def outputs(pipe, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder hidden states and the UNet's prediction from them (fixed inputs)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 8), generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        eps = pipe.unet(latents, torch.tensor([999, 499]), encoder_hidden_states=hidden).sample
    return hidden, eps


STYLE_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
LCM_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "ff.net.2"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    """A style LoRA (UNet + text encoder, alpha != rank) in peft and kohya format and an LCM-LoRA folder."""
    root = tmp_path_factory.mktemp("loras")
    pipe = tiny_sd15()
    style_unet, style_te = random_lora(pipe, rank=4, alpha=2.0, unet_modules=STYLE_UNET,
                                       te_modules=["q_proj", "v_proj", "fc1"], seed=1)
    lcm_unet, _ = random_lora(tiny_sd15(), rank=8, alpha=16.0, unet_modules=LCM_UNET, seed=2)
    return {
        "style_peft": write_peft(root / "style", style_unet, style_te, rank=4, alpha=2.0),
        "style_kohya": write_kohya(root / "style_kohya.safetensors", style_unet, style_te, alpha=2.0),
        "lcm": write_peft(root / "lcm", lcm_unet, {}, rank=8, alpha=16.0).parent,
    }


def runtime_pipe(style: Path, lcm: Path, weights=WEIGHTS):
    pipe = tiny_sd15()
    merge.load_adapter(pipe, "sd15", style, "style")
    merge.load_adapter(pipe, "sd15", lcm, "lcm")
    merge.set_weights(pipe, {"style": weights[0], "lcm": weights[1]})
    return pipe


def merged_factors(style: Path, lcm: Path, weights=WEIGHTS) -> merge.LoraFactors:
    probe = tiny_sd15()
    style_f = merge.read_factors(probe, "sd15", style)
    lcm_f = merge.read_factors(probe, "sd15", lcm)
    return merge.concat_ranks([(weights[0], style_f), (weights[1], lcm_f)])


def test_merged_lora_equals_runtime_adapters(loras, tmp_path):
    reference = outputs(runtime_pipe(loras["style_peft"], loras["lcm"]))
    factors = merged_factors(loras["style_peft"], loras["lcm"])
    assert factors["unet"]["down_blocks.0.attentions.0.proj_in"].rank == 4 + 8  # ranks concatenated
    assert "text_encoder" in factors  # the style's text-encoder layers are kept
    file = tmp_path / "merged.safetensors"
    save_file(merge.peft_state_dict(factors), str(file))
    pipe = tiny_sd15()
    merge.load_adapter(pipe, "sd15", file, "merged")
    hidden, eps = outputs(pipe)
    assert (hidden - reference[0]).abs().max() > 0 or True
    assert (hidden - reference[0]).abs().max().item() < 1e-5
    assert (eps - reference[1]).abs().max().item() < 1e-5
    # and the LoRA changes the output: the comparison is not between two bare bases
    assert (eps - outputs(tiny_sd15())[1]).abs().max().item() > 1e-3


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


def test_kohya_alpha_differs_from_rank_reads_like_peft(loras):
    probe = tiny_sd15()
    from_peft = merge.read_factors(probe, "sd15", loras["style_peft"])
    from_kohya = merge.read_factors(probe, "sd15", loras["style_kohya"])
    assert from_kohya.keys() == from_peft.keys() == {"unet", "text_encoder"}
    for component, modules in from_peft.items():
        assert modules.keys() == from_kohya[component].keys()
        for name, f in modules.items():
            assert f.scale == pytest.approx(0.5)  # alpha 2 / rank 4, not 1
            torch.testing.assert_close(f.delta(), from_kohya[component][name].delta(), atol=1e-7, rtol=0)
    kohya_out = outputs(runtime_pipe(loras["style_kohya"], loras["lcm"]))
    peft_out = outputs(runtime_pipe(loras["style_peft"], loras["lcm"]))
    assert (kohya_out[1] - peft_out[1]).abs().max().item() < 1e-5


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


# --- incompatible inputs ----------------------------------------------------------------


def test_sdxl_lora_on_sd15_base_names_the_family(tmp_path):
    second_encoder = {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 16),
                      "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(16, 4)}
    save_file(second_encoder, str(tmp_path / "te2.safetensors"))
    with pytest.raises(merge.WrongFamily, match="text_encoder_2.*sd15"):
        merge.read_factors(tiny_sd15(), "sd15", tmp_path / "te2.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sdxl_unet = {f"{name}.lora_down.weight": torch.zeros(4, 2048), f"{name}.lora_up.weight": torch.zeros(16, 4),
                 f"{name}.alpha": torch.tensor(4.0)}
    save_file(sdxl_unet, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(merge.WrongFamily, match=r"attn2\.to_k.*2048.*sdxl LoRA"):
        merge.read_factors(tiny_sd15(), "sd15", tmp_path / "sdxl.safetensors")


def test_shape_mismatch_names_the_module(tmp_path):
    unet_sd, _ = random_lora(tiny_sd15(widths=(8, 16)), rank=4, alpha=4, unet_modules=["conv1"])
    file = write_peft(tmp_path / "narrow", unet_sd, {}, rank=4, alpha=4)
    with pytest.raises(merge.LoraShapeMismatch, match=r"unet\.down_blocks\.0\.resnets\.0\.conv1: LoRA A \(4, 8, 3, 3\)"):
        merge.load_adapter(tiny_sd15(), "sd15", file, "narrow")


def test_unknown_key_format_is_refused(tmp_path):
    save_file({"model.diffusion_model.input_blocks.1.1.proj_in.hada_w1_a": torch.zeros(4, 4)},
              str(tmp_path / "loha.safetensors"))
    with pytest.raises(merge.UnknownLoraFormat, match="no known LoRA format.*hada_w1_a"):
        merge.read_factors(tiny_sd15(), "sd15", tmp_path / "loha.safetensors")
    save_file({"unet.down_blocks.0.attentions.0.no_such_layer.lora_A.weight": torch.zeros(4, 16),
               "unet.down_blocks.0.attentions.0.no_such_layer.lora_B.weight": torch.zeros(16, 4)},
              str(tmp_path / "ghost.safetensors"))
    with pytest.raises(merge.LoraIncompatible, match="no_such_layer: no such layer"):
        merge.read_factors(tiny_sd15(), "sd15", tmp_path / "ghost.safetensors")


def test_pickle_lora_is_refused(tmp_path):
    (tmp_path / "style.ckpt").write_bytes(b"not opened")
    with pytest.raises(PickleRefused, match="arbitrary code"):
        merge.lora_file(tmp_path / "style.ckpt")


def test_old_attention_processor_keys_are_read(tmp_path):
    unet_sd, _ = random_lora(tiny_sd15(), rank=4, alpha=4, unet_modules=["to_q"])
    old = {k.replace(".to_q.lora_A.weight", ".processor.to_q_lora.down.weight")
            .replace(".to_q.lora_B.weight", ".processor.to_q_lora.up.weight"): v for k, v in unet_sd.items()}
    save_file(old, str(tmp_path / "old.safetensors"))
    factors = merge.read_factors(tiny_sd15(), "sd15", tmp_path / "old.safetensors")
    assert len(factors["unet"]) == len(unet_sd) // 2
    name = next(iter(factors["unet"]))
    torch.testing.assert_close(factors["unet"][name].up, unet_sd[f"{name}.lora_B.weight"])


def test_saved_folder_round_trips_in_both_formats_with_alpha_not_rank(loras, tmp_path):
    """Style factors (alpha 2, rank 4) and the merged LoRA written in peft and kohya format read back exactly."""
    probe = tiny_sd15()
    style = merge.read_factors(probe, "sd15", loras["style_peft"])
    merged = merged_factors(loras["style_peft"], loras["lcm"])
    for label, factors in (("style", style), ("merged", merged)):
        paths = merge.save_lora_folder(tmp_path / label, factors, family="sd15", base_meta={"name": "tiny"},
                                       title=label, description="test")
        for fmt in ("diffusers", "kohya"):
            back = merge.read_factors(probe, "sd15", paths[fmt])
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


def test_selection_rule_fails_closed_and_lists_every_violation():
    from components.config import MergeConfig
    from components.merge_eval import select_best

    def row(l1, retention, adherence, fd):
        return {"label": f"merged LoRA ({l1}, 1)", "variant": "merged", "l1": l1, "l2": 1.0,
                "style_retention": retention, "adherence": adherence, "fd": fd}

    rows = [row(0.6, 0.7, 0.95, 1.0), row(0.8, 0.85, 0.9, 2.0), row(1.0, 0.95, 0.7, 0.5),
            {**row(0.8, 0.99, 0.99, 0.1), "variant": "adapters"}]  # only merged rows compete
    best, violations = select_best(rows, MergeConfig(min_style_retention=0.8, min_adherence=0.8))
    assert best["l1"] == 0.8
    assert len(violations) == 2 and any("(0.6, 1)" in v and "retention" in v for v in violations)
    none, violations = select_best(rows, MergeConfig(min_style_retention=0.99, min_adherence=0.8))
    assert none is None and len(violations) == 4  # 3 retention + 1 adherence


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

    from components.ldm_layout import unet_key_to_ldm

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
    counts = merge.load_adapter(runtime, "sdxl", style, "style")
    assert counts["text_encoder"] > 0 and counts["text_encoder_2"] > 0  # both encoders applied
    merge.load_adapter(runtime, "sdxl", lcm, "lcm")
    merge.set_weights(runtime, {"style": WEIGHTS[0], "lcm": WEIGHTS[1]})
    reference = sdxl_outputs(runtime)
    probe = tiny_sdxl()
    merged = merge.concat_ranks([(WEIGHTS[0], merge.read_factors(probe, "sdxl", style)),
                                 (WEIGHTS[1], merge.read_factors(probe, "sdxl", lcm))])
    paths = merge.save_lora_folder(tmp_path / "merged", merged, family="sdxl", base_meta={"name": "tiny-sdxl"},
                                   title="m", description="d")
    for fmt in ("diffusers", "kohya"):
        single = tiny_sdxl()
        merge.load_adapter(single, "sdxl", paths[fmt], "merged")
        assert (sdxl_outputs(single) - reference).abs().max().item() < 1e-5, fmt
    assert (reference - sdxl_outputs(tiny_sdxl())).abs().max().item() > 1e-3
    # 3. The SD-1.5 base refuses it, naming the second text encoder.
    with pytest.raises(merge.WrongFamily, match="text_encoder_2"):
        merge.load_adapter(tiny_sd15(), "sd15", style, "style")
