"""Base loading (contract 1): family detection, fingerprints, and pickle refusal."""

import json
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from components.config import ConfigError, load_params
from components.models.base_model import (
    PickleRefused,
    check_reference,
    detect_family,
    fingerprints_of,
    load_base,
    load_vae,
    module_fingerprint,
    refuse_pickle,
    resolve_base,
)
from tests.tiny_models import tiny_pipeline


@pytest.fixture(scope="module")
def tiny_sd15_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15")
    tiny_pipeline("sd15", folder / "src").save_pretrained(folder / "base", safe_serialization=True)
    return folder / "base"


@pytest.fixture(scope="module")
def tiny_sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    tiny_pipeline("sdxl", folder / "src").save_pretrained(folder / "base", safe_serialization=True)
    return folder / "base"


class _Boom:
    """Unpickling this writes a marker file: proof that a pickle was (wrongly) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".pkl", ".joblib"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(_Boom(marker)))
    for call in (refuse_pickle, detect_family, load_base, load_vae):
        with pytest.raises(PickleRefused, match=suffix.replace(".", r"\.") + " files are pickles"):
            call(path)
    assert not marker.exists()


def test_folder_with_only_pickle_weights_is_refused(tmp_path, tiny_sd15_folder):
    import shutil

    folder = tmp_path / "base"
    shutil.copytree(tiny_sd15_folder, folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(PickleRefused, match="unet"):
        load_base(folder)


def test_family_from_single_file_keys(tmp_path):
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "cond_stage_model.transformer.x": torch.zeros(1)}, str(sd15))
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "conditioner.embedders.1.model.x": torch.zeros(1)}, str(sdxl))
    odd = tmp_path / "odd.safetensors"
    save_file({"something.else": torch.zeros(1)}, str(odd))
    assert detect_family(sd15) == "sd15"
    assert detect_family(sdxl) == "sdxl"
    with pytest.raises(ValueError, match="family"):
        detect_family(odd)


def test_load_folder_detects_family_and_fingerprints(tiny_sd15_folder, tiny_sdxl_folder, tmp_path):
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sd15 = load_base(tiny_sd15_folder)
    assert sd15.family == "sd15"
    assert set(sd15.fingerprints) == {"unet", "vae", "text_encoder"}
    sdxl = load_base(tiny_sdxl_folder)
    assert sdxl.family == "sdxl"
    assert set(sdxl.fingerprints) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    # What was loaded is the saved pipeline of that family: its classes, configs and weights.
    assert type(sd15.pipe) is StableDiffusionPipeline and type(sdxl.pipe) is StableDiffusionXLPipeline
    for base in (sd15, sdxl):
        assert type(base.pipe.unet) is UNet2DConditionModel and type(base.pipe.vae) is AutoencoderKL
        assert type(base.pipe.text_encoder) is CLIPTextModel
        assert base.fingerprint == base.fingerprints["unet"]
        assert next(base.pipe.unet.parameters()).dtype == torch.float32  # the default dtype
    assert type(sdxl.pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert sd15.pipe.unet.config.addition_embed_type is None
    assert sdxl.pipe.unet.config.addition_embed_type == "text_time"
    for family, base in (("sd15", sd15), ("sdxl", sdxl)):
        source = tiny_pipeline(family, tmp_path / family)  # the same seed as the saved one
        assert base.fingerprints == fingerprints_of(source), family
        assert base.pipe.unet.config.cross_attention_dim == source.unet.config.cross_attention_dim
        assert base.pipe.vae.config.latent_channels == source.vae.config.latent_channels == 4
    # Stable across loads.
    assert load_base(tiny_sd15_folder).fingerprints == sd15.fingerprints
    with pytest.raises(ConfigError, match="family"):
        load_base(tiny_sd15_folder, family="sdxl")


def test_fingerprint_tracks_weights_and_shared_vae(tiny_sd15_folder):
    base = load_base(tiny_sd15_folder)
    vae, vae_fp = load_vae(tiny_sd15_folder)
    assert vae_fp == base.fingerprints["vae"]
    unet = base.pipe.unet
    before = module_fingerprint(unet)
    with torch.no_grad():
        next(unet.parameters()).view(-1)[0] += 1.0
    assert module_fingerprint(unet) != before  # a fine-tune changes the base fingerprint
    assert module_fingerprint(vae) == vae_fp  # while its VAE, untouched, keeps its own


def test_resolve_base_by_name_and_by_path(tiny_sd15_folder):
    params = load_params("params.yaml")
    name, cfg = resolve_base(params, "toy")
    assert name == "toy" and cfg.family == "sd15"
    name, cfg = resolve_base(params, str(tiny_sd15_folder))
    assert cfg.family == "sd15" and cfg.reference == str(tiny_sd15_folder)
    with pytest.raises(ConfigError, match="known: toy"):
        resolve_base(params, "no-such-base-here")


MISSING = "base reference /nonexistent/base: no such file or folder (and not a Hub repo id)"


@pytest.mark.parametrize("args", [
    ["distill", "--dry-run"],  # reads the UNet config
    ["distill"],  # loads the base
    ["encode"],  # loads the VAE
])
def test_a_missing_base_folder_is_named_not_reported_as_a_bad_repo_id(lcmlora_cli, args) -> None:
    """It used to end in "HFValidationError: Repo id must be in the form 'repo_name'..."."""
    code, err = lcmlora_cli(*args, "--set", "bases.toy.reference=/nonexistent/base")
    assert code != 0
    assert MISSING in err, err
    assert "HFValidationError" not in err


@pytest.mark.parametrize("reference", ["./nowhere", "../nowhere/base", "~/nowhere", "data/nowhere",
                                       "missing.safetensors", "not a repo id"])
def test_references_that_look_like_paths_are_checked_before_diffusers(reference) -> None:
    with pytest.raises(FileNotFoundError, match=rf"base reference {re.escape(reference)}: no such file or folder"):
        load_base(reference)


def test_hub_ids_and_existing_folders_pass_the_check(tiny_sd15_folder, tmp_path, monkeypatch) -> None:
    """Past the check, a folder is read as a folder and a hub id is asked of huggingface_hub."""
    import huggingface_hub

    for reference in ("runwayml/stable-diffusion-v1-5", tiny_sd15_folder, "data/toy/base"):
        assert check_reference(reference) is None, reference
    assert detect_family(tiny_sd15_folder) == "sd15"
    assert detect_family("data/toy/base") == load_params("params.yaml").bases["toy"].family == "sd15"
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["x", "y"]}))
    asked = []

    def hub_download(repo_id, filename, **kwargs):  # the hub itself is not this test's concern
        asked.append((repo_id, filename))
        return str(index)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub_download)
    assert detect_family("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert asked == [("stabilityai/stable-diffusion-xl-base-1.0", "model_index.json")]
