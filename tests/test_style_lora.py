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
