"""The hard toy world (issue 12) at reduced size: renderer, source, judges, base."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from components.toy.hard.render import HARD_SIZE, Scene, caption_for, render_scene
from components.toy.hard.source import write_hard_source

ROOT = Path(__file__).resolve().parents[1]
JUDGES_DIR = ROOT / "data/toy/hard/judges"
BASE_DIR = ROOT / "data/toy/hard/base"
BASE_ADHERENCE_BOUND = 0.7  # teacher-50 adherence on 40 samples; the recorded 200-sample value is higher


def _digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


def test_caption_names_both_parts_in_either_order():
    scene = Scene(7, 0, 2, 2)
    assert caption_for(scene) == "a red seven on the left and a blue two on the right"
    assert caption_for(scene, right_first=True) == "a blue two on the right and a red seven on the left"


def test_render_puts_each_colour_on_its_side():
    digit = np.full((8, 8), 16.0)  # a solid block shows the ink colour plainly
    image = np.asarray(render_scene(digit, digit, Scene(0, 0, 1, 2)), dtype=float)
    assert image.shape == (HARD_SIZE, HARD_SIZE, 3)
    left, right = image[32, 16], image[32, 48]
    assert left[0] > 150 and left[2] < 80  # red on the left
    assert right[2] > 150 and right[0] < 80  # blue on the right


def test_every_caption_fits_the_text_encoder_untruncated(tmp_path):
    import itertools

    from components.toy.hard.base import MAX_TOKENS, hard_tokenizer

    tokenizer = hard_tokenizer(tmp_path)
    longest = max(len(tokenizer(caption_for(Scene(*parts), bool(order))).input_ids)
                  for parts in itertools.product(range(10), range(4), range(10), range(4)) for order in (0, 1))
    assert longest <= MAX_TOKENS


def test_source_is_deterministic_and_laion_shaped(tmp_path):
    a = write_hard_source(tmp_path / "a", rows=500, seed=1)
    write_hard_source(tmp_path / "b", rows=500, seed=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    table = pq.read_table(tmp_path / "a" / "metadata.parquet")
    for column in ("URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE",
                   "original_width", "original_height"):
        assert column in table.schema.names
    assert a["rows"] == 560 and a["defects"]["duplicate"] == 60
    assert len(a["sizes"]) >= 8  # varied original sizes for SDXL micro-conditioning
    summary = json.loads((tmp_path / "a" / "toy_summary.json").read_text())
    assert summary["expected_curated"] == a["expected_curated"]
    with tarfile.open(tmp_path / "a" / "00000.tar") as tar:
        names = tar.getnames()
    assert any(n.endswith(".jpg") for n in names) and any(n.endswith(".txt") for n in names)


def test_source_original_sizes_keep_the_scene_at_the_origin(tmp_path):
    from PIL import Image

    from components.toy.hard.source import original_canvas

    scene = render_scene(np.full((8, 8), 16.0), np.full((8, 8), 16.0), Scene(0, 0, 1, 2))
    canvas = original_canvas(scene, np.random.default_rng(4))
    short = min(canvas.size)
    assert short >= HARD_SIZE
    crop = canvas.crop((0, 0, short, short)).resize((HARD_SIZE, HARD_SIZE), Image.Resampling.BICUBIC)
    assert np.abs(np.asarray(crop, dtype=float) - np.asarray(scene, dtype=float)).mean() < 6.0


def test_committed_judges_read_real_renders():
    from components.toy.classifier import digit_split, load_sklearn_digits
    from components.toy.hard.data import render_scenes
    from components.toy.hard.judges import adherence, load_judges

    judges = load_judges(JUDGES_DIR)
    images8, labels = load_sklearn_digits()
    held_out = digit_split(labels, 0)[1]
    scenes = render_scenes(images8, labels, 400, np.random.default_rng(11), held_out, jitter=False)
    assert adherence(judges, scenes.images, scenes.parts) >= 0.95  # canonical renders, as the builder checks
    assert judges.features(scenes.images[:4]).shape == (4, 128)


def test_swapped_sides_counts_scenes_drawn_mirrored():
    from components.toy.classifier import digit_split, load_sklearn_digits
    from components.toy.hard.data import render_scenes
    from components.toy.hard.judges import adherence, load_judges, swapped_sides

    judges = load_judges(JUDGES_DIR)
    images8, labels = load_sklearn_digits()
    scenes = render_scenes(images8, labels, 200, np.random.default_rng(13), digit_split(labels, 0)[1], jitter=False)
    mirrored = scenes.parts[:, [2, 3, 0, 1]]
    distinct = float((scenes.parts != mirrored).any(dim=1).float().mean())
    assert swapped_sides(judges, scenes.images, scenes.parts) <= 0.02  # drawn as asked
    # the same renders judged against the mirrored scenes: every distinct scene reads swapped, none adheres
    assert swapped_sides(judges, scenes.images, mirrored) >= 0.95 * distinct
    assert adherence(judges, scenes.images, mirrored) <= 1.0 - 0.95 * distinct


def test_committed_base_loads_and_adheres_at_50_steps():
    from diffusers import StableDiffusionPipeline

    from components.toy.hard.evaluate import prompt_set, sample
    from components.toy.hard.judges import adherence, load_judges, swapped_sides

    pipe = StableDiffusionPipeline.from_pretrained(str(BASE_DIR), safety_checker=None, requires_safety_checker=False)
    training = json.loads((BASE_DIR / "training.json").read_text())
    prompts = prompt_set(40, seed=12)
    images = sample(pipe, "dpm++", 50, prompts.captions, training["params"]["guidance_scale"], seed=0)
    assert images.shape == (40, 3, HARD_SIZE, HARD_SIZE)
    judges = load_judges(JUDGES_DIR)
    assert adherence(judges, images, prompts.parts) >= BASE_ADHERENCE_BOUND
    assert swapped_sides(judges, images, prompts.parts) <= 0.1  # each digit on the side its caption names


def test_difficulty_sampling_at_another_spacing_does_not_leak_into_the_next_row():
    """The difficulty table samples each row from the base's own scheduler config: a trailing row
    changes only itself (`sample(..., scheduler_config=...)`)."""
    from diffusers import StableDiffusionPipeline

    from components.toy.hard.evaluate import prompt_set, sample

    pipe = StableDiffusionPipeline.from_pretrained(str(BASE_DIR), safety_checker=None, requires_safety_checker=False)
    own = dict(pipe.scheduler.config)
    assert own["timestep_spacing"] == "leading"
    captions = prompt_set(2, seed=12).captions
    leading = sample(pipe, "ddim", 4, captions, 5.0, seed=0, scheduler_config=own)
    assert pipe.scheduler.timesteps.tolist() == [751, 501, 251, 1]  # leading, steps_offset 1
    trailing = sample(pipe, "ddim", 4, captions, 5.0, seed=0, timestep_spacing="trailing", scheduler_config=own)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    again = sample(pipe, "ddim", 4, captions, 5.0, seed=0, scheduler_config=own)
    assert pipe.scheduler.config.timestep_spacing == "leading"
    assert torch.equal(again, leading) and not torch.equal(trailing, leading)


def test_hard_base_architecture_round_trips_through_the_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from components.toy.hard.base import (
        assemble_hard_pipeline,
        hard_text_encoder,
        hard_tokenizer,
        hard_unet,
        hard_vae,
    )

    tokenizer = hard_tokenizer(tmp_path / "tok")
    pipe = assemble_hard_pipeline(hard_vae(), hard_unet(), hard_text_encoder(tokenizer), tokenizer)
    pipe.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "base"), safety_checker=None,
                                                     requires_safety_checker=False)
    loaded.set_progress_bar_config(disable=True)
    caption = caption_for(Scene(7, 0, 2, 2))
    assert len(loaded.tokenizer(caption).input_ids) <= loaded.tokenizer.model_max_length
    out = loaded([caption], num_inference_steps=2, guidance_scale=5.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, HARD_SIZE, HARD_SIZE)


def test_difficulty_rule_reads_the_table():
    from components.toy.hard.evaluate import difficulty_rule

    table = {"ddim-50": {"adherence": 0.82, "fd": 10.0}, "dpm++-50": {"adherence": 0.86, "fd": 12.0},
             "ddim-4": {"adherence": 0.80, "fd": 30.0}, "dpm++-4": {"adherence": 0.78, "fd": 25.0}}
    rule = difficulty_rule(table)
    assert rule["teacher50"] == "dpm++-50" and rule["base_good"]
    assert rule["four_steps_worse"]  # adherence 0.80 > 0.85 x 0.86, but best FD 25 >= 2 x 12
    table["dpm++-4"]["fd"] = table["ddim-4"]["fd"] = 20.0
    assert not difficulty_rule(table)["four_steps_worse"]
    table["ddim-50"]["adherence"] = table["dpm++-50"]["adherence"] = 0.7
    assert not difficulty_rule(table)["base_good"]
    assert "best_of_spacings" not in difficulty_rule(table)


def test_difficulty_rule_takes_the_teachers_best_spacing():
    """With trailing-spacing rows, the rule is also read over both spacings: a teacher that is
    clearly worse at 4 steps only at its own (leading) spacing is not clearly worse."""
    from components.toy.hard.evaluate import difficulty_rule

    table = {"ddim-50": {"adherence": 1.0, "fd": 500.0}, "dpm++-50": {"adherence": 1.0, "fd": 490.0},
             "ddim-4": {"adherence": 0.69, "fd": 810.0}, "dpm++-4": {"adherence": 0.70, "fd": 760.0},
             "ddim-50-trailing": {"adherence": 1.0, "fd": 520.0}, "dpm++-50-trailing": {"adherence": 1.0, "fd": 495.0},
             "ddim-4-trailing": {"adherence": 0.96, "fd": 570.0}, "dpm++-4-trailing": {"adherence": 0.85, "fd": 440.0}}
    rule = difficulty_rule(table)
    assert rule["four_steps_worse"] and rule["teacher4_adherence"] == 0.70  # the base's own spacing
    both = rule["best_of_spacings"]
    assert both["teacher4"] == "ddim-4-trailing" and both["teacher4_adherence"] == 0.96
    assert both["teacher4_best_fd"] == 440.0 and both["teacher50"] == "dpm++-50"
    assert not both["four_steps_worse"]  # 0.96 > 0.85 x 1.0 and 440 < 2 x 490


def test_the_hard_toys_committed_data_fits_its_20_mb():
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "data/toy/hard", "data/prompts/toy-hard.txt"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert {"data/toy/hard/base/model_index.json", "data/toy/hard/sdxl/model_index.json"} <= set(tracked)
    assert sum((ROOT / f).stat().st_size for f in tracked) <= 20_000_000  # issue 12's size budget


def test_decoder_finetune_keeps_the_encoder_and_lowers_the_reconstruction_error():
    """The decoder-only fine-tune (`toy.hard.decoder_steps`): the latent space a UNet was trained on
    stays bit-identical, the decoder draws the training images better, and 0 steps is a no-op."""
    from components.toy.classifier import load_sklearn_digits
    from components.toy.hard.base import finetune_decoder, hard_vae
    from components.toy.hard.config import HardToyConfig
    from components.toy.hard.data import render_scenes

    torch.manual_seed(0)
    images8, labels = load_sklearn_digits()
    images = render_scenes(images8, labels, 32, np.random.default_rng(0)).images
    vae = hard_vae(0).eval()
    encoder = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}

    def mse() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(vae.decode(vae.encode(images).latent_dist.mean).sample, images))

    before = mse()
    assert finetune_decoder(vae, images, HardToyConfig(decoder_steps=0)) is vae
    assert mse() == before
    finetune_decoder(vae, images, HardToyConfig(decoder_steps=30, vae_batch_size=8, decoder_lr=1e-3))
    after = vae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in encoder.items())
    assert mse() < 0.7 * before
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
