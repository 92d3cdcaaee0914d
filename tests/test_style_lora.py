"""Style LoRA training: a short run on a tiny pipeline lowers the diffusion loss and leaves a loaded adapter."""

from __future__ import annotations

from components.lora import io as lora_io
from components.toy.style_lora import STYLE_ADAPTER, StyleTraining, toy_style_set, train_style_lora
from tests.tiny_merge_pipelines import tiny_sd15


def test_short_training_lowers_the_loss_and_keeps_the_base_frozen(tmp_path):
    images, captions = toy_style_set(count=64, seed=0)
    assert images.shape == (64, 3, 32, 32) and captions[0].startswith("a handwritten digit ")
    pipe = tiny_sd15(tokenizer_dir=tmp_path / "tok")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    losses = train_style_lora(pipe, images, captions, StyleTraining(rank=4, alpha=2.0, steps=40, batch_size=16,
                                                                    lr=3e-3, seed=0))
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    factors = lora_io.adapter_factors(pipe, STYLE_ADAPTER)
    assert factors["unet"] and all(f.scale == 0.5 for f in factors["unet"].values())
    after = pipe.unet.state_dict()
    for key, value in before.items():  # peft renames wrapped weights to base_layer.*
        wrapped = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert (after.get(key, after.get(wrapped)) == value).all(), key


def test_an_sdxl_pipeline_trains_with_its_pooled_embeddings_and_time_ids_and_the_lora_loads_back(tmp_path):
    import torch

    from components.toy.style_lora import encode_style_set, save_style_lora
    from tests.tiny_merge_pipelines import byte_tokenizer, tiny_sdxl

    images, captions = toy_style_set(count=32, seed=0)
    pipe = tiny_sdxl()
    pipe.tokenizer = pipe.tokenizer_2 = byte_tokenizer(tmp_path / "tok")
    inputs = encode_style_set(pipe, images[:4], captions[:4])
    assert inputs.pooled is not None  # text_encoder_2's projection
    assert inputs.pooled.shape == (4, pipe.text_encoder_2.config.projection_dim)
    assert inputs.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 4  # original size, no crop, target size
    losses = train_style_lora(pipe, images, captions, StyleTraining(rank=4, alpha=4.0, steps=30, batch_size=16,
                                                                    lr=3e-3, seed=0))
    assert len(losses) == 30 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    paths = save_style_lora(pipe, tmp_path / "lora", losses, {"name": "tiny-xl", "family": "sdxl"}, "tiny-xl-style",
                            "test", family="sdxl")
    fresh = tiny_sdxl()
    latents = inputs.latents[:1]
    conditioning = {"encoder_hidden_states": inputs.embeddings[:1],
                    "added_cond_kwargs": {"text_embeds": inputs.pooled[:1], "time_ids": inputs.time_ids[:1]}}
    with torch.no_grad():
        plain = fresh.unet(latents, 500, **conditioning).sample
        lora_io.load_adapter(fresh, "sdxl", paths["diffusers"], STYLE_ADAPTER)
        styled = fresh.unet(latents, 500, **conditioning).sample
        pipe.unet.set_adapters([STYLE_ADAPTER])
        trained = pipe.unet(latents, 500, **conditioning).sample
    assert not torch.allclose(plain, styled)  # the LoRA changes the fresh base's prediction...
    torch.testing.assert_close(styled, trained, atol=1e-5, rtol=1e-4)  # ...as the trained adapter does
