"""components/lora/io.py: LoRA files of every format read as diffusers reads them, and every
incompatible input refused with an error naming the module (tiny random pipelines, seconds on CPU)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from components.lora import io as lora_io
from components.lora.formats import LORA_WEIGHT_NAME
from components.models.base_model import PickleRefused
from tests.tiny_merge_pipelines import (
    make_loras,
    outputs,
    random_lora,
    runtime_pipe,
    tiny_sd15,
    write_peft,
)


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, Path]:
    return make_loras(tmp_path_factory.mktemp("loras"))


def test_kohya_alpha_differs_from_rank_reads_like_peft(loras):
    probe = tiny_sd15()
    from_peft = lora_io.read_factors(probe, "sd15", loras["style_peft"])
    from_kohya = lora_io.read_factors(probe, "sd15", loras["style_kohya"])
    assert from_kohya.keys() == from_peft.keys() == {"unet", "text_encoder"}
    for component, modules in from_peft.items():
        assert modules.keys() == from_kohya[component].keys()
        for name, f in modules.items():
            assert f.scale == pytest.approx(0.5)  # alpha 2 / rank 4, not 1
            torch.testing.assert_close(f.delta(), from_kohya[component][name].delta(), atol=1e-7, rtol=0)
    kohya_out = outputs(runtime_pipe(loras["style_kohya"], loras["lcm"]))
    peft_out = outputs(runtime_pipe(loras["style_peft"], loras["lcm"]))
    assert (kohya_out[1] - peft_out[1]).abs().max().item() < 1e-5



def test_sdxl_lora_on_sd15_base_names_the_family(tmp_path):
    second_encoder = {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 16),
                      "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(16, 4)}
    save_file(second_encoder, str(tmp_path / "te2.safetensors"))
    with pytest.raises(lora_io.WrongFamily, match="text_encoder_2.*sd15"):
        lora_io.read_factors(tiny_sd15(), "sd15", tmp_path / "te2.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sdxl_unet = {f"{name}.lora_down.weight": torch.zeros(4, 2048), f"{name}.lora_up.weight": torch.zeros(16, 4),
                 f"{name}.alpha": torch.tensor(4.0)}
    save_file(sdxl_unet, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(lora_io.WrongFamily, match=r"attn2\.to_k.*2048.*sdxl LoRA"):
        lora_io.read_factors(tiny_sd15(), "sd15", tmp_path / "sdxl.safetensors")



def test_shape_mismatch_names_the_module(tmp_path):
    unet_sd, _ = random_lora(tiny_sd15(widths=(8, 16)), rank=4, alpha=4, unet_modules=["conv1"])
    file = write_peft(tmp_path / "narrow", unet_sd, {}, rank=4, alpha=4)
    with pytest.raises(lora_io.LoraShapeMismatch, match=r"unet\.down_blocks\.0\.resnets\.0\.conv1: LoRA A \(4, 8, 3, 3\)"):
        lora_io.load_adapter(tiny_sd15(), "sd15", file, "narrow")



def test_unknown_key_format_is_refused(tmp_path):
    save_file({"model.diffusion_model.input_blocks.1.1.proj_in.hada_w1_a": torch.zeros(4, 4)},
              str(tmp_path / "loha.safetensors"))
    with pytest.raises(lora_io.UnknownLoraFormat, match="no known LoRA format.*hada_w1_a"):
        lora_io.read_factors(tiny_sd15(), "sd15", tmp_path / "loha.safetensors")
    save_file({"unet.down_blocks.0.attentions.0.no_such_layer.lora_A.weight": torch.zeros(4, 16),
               "unet.down_blocks.0.attentions.0.no_such_layer.lora_B.weight": torch.zeros(16, 4)},
              str(tmp_path / "ghost.safetensors"))
    with pytest.raises(lora_io.LoraIncompatible, match="no_such_layer: no such layer"):
        lora_io.read_factors(tiny_sd15(), "sd15", tmp_path / "ghost.safetensors")



def test_pickle_lora_is_refused(tmp_path):
    (tmp_path / "style.ckpt").write_bytes(b"not opened")
    with pytest.raises(PickleRefused, match="arbitrary code"):
        lora_io.lora_file(tmp_path / "style.ckpt")



def test_old_attention_processor_keys_are_read(tmp_path):
    unet_sd, _ = random_lora(tiny_sd15(), rank=4, alpha=4, unet_modules=["to_q"])
    old = {k.replace(".to_q.lora_A.weight", ".processor.to_q_lora.down.weight")
            .replace(".to_q.lora_B.weight", ".processor.to_q_lora.up.weight"): v for k, v in unet_sd.items()}
    save_file(old, str(tmp_path / "old.safetensors"))
    factors = lora_io.read_factors(tiny_sd15(), "sd15", tmp_path / "old.safetensors")
    assert len(factors["unet"]) == len(unet_sd) // 2
    name = next(iter(factors["unet"]))
    torch.testing.assert_close(factors["unet"][name].up, unet_sd[f"{name}.lora_B.weight"])


# --- corrupt files: the error names the file --------------------------------------------

STYLE = Path("data/toy/style_lora/pytorch_lora_weights.safetensors")


def _corrupt(folder: Path, how: str) -> Path:
    """A LoRA artifact folder whose weights file is truncated to half or is random bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_WEIGHT_NAME
    data = STYLE.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(4096))
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_corrupt_style_file_is_named_by_merge(lcmlora_cli, tmp_path, how) -> None:
    """It used to end in "SafetensorError: ... incomplete metadata" without the file's name."""
    bad = _corrupt(tmp_path / "style", how)
    code, err = lcmlora_cli("merge", "--style", str(bad), "--lcm", str(STYLE.parent), "--output", str(tmp_path / "m"))
    assert code != 0
    assert f"{bad}: not a readable .safetensors file" in err, err
    assert "truncated or not safetensors at all" in err


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_corrupt_file_inside_the_lcm_folder_is_named_by_merge(lcmlora_cli, tmp_path, how) -> None:
    bad = _corrupt(tmp_path / "lcm", how)
    code, err = lcmlora_cli("merge", "--style", str(STYLE), "--lcm", str(bad.parent), "--output", str(tmp_path / "m"))
    assert code != 0
    assert f"{bad}: not a readable .safetensors file" in err, err


def test_a_corrupt_lora_given_to_evaluate_is_named_before_the_base_loads(lcmlora_cli, tmp_path, monkeypatch) -> None:
    import components.models.base_model

    def no_base(*_a, **_k):
        raise AssertionError("the base was loaded before the LoRA file was checked")

    monkeypatch.setattr(components.models.base_model, "load_base", no_base)
    bad = _corrupt(tmp_path / "lora", "truncated")
    code, err = lcmlora_cli("evaluate", "--lora", str(bad.parent), "--output", str(tmp_path / "e"))
    assert code != 0
    assert f"{bad}: not a readable .safetensors file (Error while deserializing header" in err, err


def test_reading_a_corrupt_file_directly_names_it(tmp_path) -> None:
    from components.lora.formats import UnreadableLoraFile, read_lora_file, read_metadata

    bad = _corrupt(tmp_path / "x", "garbage")
    for read in (read_lora_file, read_metadata):
        with pytest.raises(UnreadableLoraFile, match=re.escape(str(bad))):
            read(bad)
