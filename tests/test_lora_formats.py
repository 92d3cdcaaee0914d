"""LoRA files: the peft/diffusers file and the kohya file load in diffusers with the trained alpha."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from components.config import DistillConfig
from components.lora import adapter as lora_mod
from components.lora import formats as lf
from tests.tiny_models import tiny_pipeline, unet_inputs

RANK, ALPHA = 4, 12  # alpha != rank: a loader that assumes alpha = rank is off by 3x
TARGETS = DistillConfig().target_modules
BASE_META = {"name": "tiny", "family": "sd15", "resolution": 32, "prediction_type": "epsilon", "fingerprint": "abc"}


def trained_lora_unet(family: str, tmp_path):
    """A tiny UNet with a LoRA whose B is non-zero (as after training)."""
    pipe = tiny_pipeline(family, tmp_path / "pipe")
    unet = pipe.unet
    lora_mod.add_lora(unet, lora_mod.lora_config(RANK, ALPHA, TARGETS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_mod.lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pipe, unet


def unet_out(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_peft_and_kohya_files_load_with_trained_alpha(family, tmp_path):
    _pipe, unet = trained_lora_unet(family, tmp_path)
    inputs = unet_inputs(unet)
    expected = unet_out(unet, inputs)
    with lora_mod.adapters_disabled(unet):
        base_out = unet_out(unet, inputs)
    assert (expected - base_out).abs().max() > 1e-2  # the LoRA really changes the output

    paths = lf.save_lora(tmp_path / "lora", lora_mod.unet_lora_state_dict(unet), rank=RANK, alpha=ALPHA,
                         base_meta={**BASE_META, "family": family})
    assert set(paths) == {"diffusers", "kohya"}

    fresh = tiny_pipeline(family, tmp_path / "pipe2")  # same seed: same base weights
    fresh.load_lora_weights(str(tmp_path / "lora"))  # the folder: picks pytorch_lora_weights.safetensors
    peft_out = unet_out(fresh.unet, inputs)
    assert (peft_out - expected).abs().max() < 1e-5

    fresh_k = tiny_pipeline(family, tmp_path / "pipe3")
    fresh_k.load_lora_weights(str(tmp_path / "lora"), weight_name=lf.KOHYA_WEIGHT_NAME)
    kohya_out = unet_out(fresh_k.unet, inputs)
    assert (kohya_out - peft_out).abs().max() < 1e-5


def test_kohya_file_keys_alpha_and_metadata(tmp_path):
    _, unet = trained_lora_unet("sd15", tmp_path)
    sd = lora_mod.unet_lora_state_dict(unet)
    paths = lf.save_lora(tmp_path / "lora", sd, rank=RANK, alpha=ALPHA, base_meta=BASE_META)
    with safe_open(str(paths["kohya"]), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_up.weight" in keys
    assert len(alphas) == len(sd) // 2 and set(alphas.values()) == {float(ALPHA)}
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_sd_model_name"] == "tiny"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    with safe_open(str(paths["diffusers"]), framework="pt") as f:
        packed = json.loads(f.metadata()[lf.METADATA_KEY])
        assert all(k.startswith("unet.") for k in f.keys())  # noqa: SIM118 (safe_open)
    assert packed["unet.r"] == RANK and packed["unet.lora_alpha"] == ALPHA


def test_read_lora_file_round_trips_both_formats(tmp_path):
    _, unet = trained_lora_unet("sdxl", tmp_path)
    sd = lora_mod.unet_lora_state_dict(unet)
    paths = lf.save_lora(tmp_path / "lora", sd, rank=RANK, alpha=ALPHA, base_meta=BASE_META)
    peft_sd, peft_alphas = lf.read_lora_file(paths["diffusers"])
    kohya_sd, kohya_alphas = lf.read_lora_file(paths["kohya"])
    assert peft_sd.keys() == kohya_sd.keys() == {f"unet.{k}" for k in sd}
    assert peft_alphas == kohya_alphas and set(peft_alphas.values()) == {float(ALPHA)}
    for k in peft_sd:
        assert torch.equal(peft_sd[k], kohya_sd[k])
    module = next(iter(peft_alphas))
    delta = lf.lora_delta(peft_sd, peft_alphas, module)
    assert delta.shape[0] == peft_sd[f"{module}.lora_B.weight"].shape[0]


def test_read_lora_file_old_diffusers_keys_and_missing_metadata(tmp_path):
    a, b = torch.randn(4, 16), torch.randn(16, 4)
    old = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": a,
           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": b,
           "unet.mid_block.attentions.0.proj_in.lora.down.weight": a.clone(),
           "unet.mid_block.attentions.0.proj_in.lora.up.weight": b.clone()}
    save_file(old, str(tmp_path / "old.safetensors"))
    sd, alphas = lf.read_lora_file(tmp_path / "old.safetensors")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in sd
    assert "unet.mid_block.attentions.0.proj_in.lora_B.weight" in sd
    assert set(alphas.values()) == {4.0}  # no metadata: alpha = rank, as diffusers assumes


def test_bad_inputs_fail_clearly(tmp_path):
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(lf.LoraFormatError, match="model.weight"):
        lf.read_lora_file(tmp_path / "x.safetensors")
    with pytest.raises(lf.LoraFormatError, match="pickle"):
        lf.read_lora_file(tmp_path / "x.ckpt")
    with pytest.raises(lf.LoraFormatError, match="not a kohya"):
        lf.kohya_to_module("unet_down_blocks_0")
    assert lf.kohya_to_module("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj") == (
        "unet", "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj")
    assert lf.kohya_to_module("lora_te2_text_model_encoder_layers_3_self_attn_q_proj") == (
        "text_encoder_2", "text_model.encoder.layers.3.self_attn.q_proj")


def test_the_same_tensors_and_metadata_give_the_same_bytes_in_every_process(tmp_path) -> None:
    """safetensors writes its metadata map in a random order per process; lcmlora's save_file sorts it."""
    import hashlib
    import subprocess
    import sys

    script = ("import sys, torch\nfrom components.lora.formats import save_file\n"
              "save_file({'b': torch.arange(6.).reshape(2, 3), 'a': torch.ones(3, dtype=torch.float16)}, sys.argv[1],"
              " metadata={k: k * 3 for k in ('format', 'ss_network_dim', 'lcmlora.base', 'modelspec.title', 'z', 'é')})\n")
    digests = set()
    for i in range(3):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=Path(__file__).resolve().parents[1])
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1, "three processes wrote three different files"
    tensors, meta = lf.read_safetensors(tmp_path / "0.safetensors")
    assert meta == {k: k * 3 for k in ("format", "ss_network_dim", "lcmlora.base", "modelspec.title", "z", "é")}
    torch.testing.assert_close(tensors["b"], torch.arange(6.).reshape(2, 3))
    assert tensors["a"].dtype == torch.float16
