"""Builders of the hard toy's committed models: the judges and the SD-1.5-family base.

Each builder renders scenes from sklearn's digits, trains, measures, and writes the model with
a JSON report beside it.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from components.progress import Progress, ProgressFn
from components.toy.classifier import digit_split, load_sklearn_digits
from components.toy.hard.base import (
    assemble_hard_pipeline,
    encode_latents,
    finetune_decoder,
    hard_text_encoder,
    hard_tokenizer,
    token_ids,
    train_hard_unet,
    train_hard_vae,
    trained_seconds,
    unit_variance_scale,
)
from components.toy.hard.config import HardToyConfig
from components.toy.hard.data import render_scenes
from components.toy.hard.judges import adherence, save_judges, train_judges
from components.toy.hard.render import HARD_WORDS
from components.toy.hard.style import vae_training_images
from components.toy.hard.text_pretrain import pretrain_text_encoder
from components.toy.tokenizer import write_tokenizer_files


def device_name(device: str = "cpu") -> str:
    """The GPU, or the CPU and thread count, this process trains on."""
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def build_judges(s: HardToyConfig, progress: ProgressFn | None = None) -> dict:
    """Train the judges on scenes of the training digits; check adherence on held-out digits' renders.

    Raises ValueError (and saves nothing) below `min_judge_adherence` on the canonical renders.
    """
    images8, labels = load_sklearn_digits()
    train_idx, test_idx = digit_split(labels, s.seed)
    start = time.time()
    train = render_scenes(images8, labels, s.judges_scenes, np.random.default_rng(s.seed), train_idx, layout=s.layout)
    judges = train_judges(train.images, train.parts, epochs=s.judges_epochs, seed=s.seed,
                          callback=None if progress is None else
                          lambda i, n, loss: progress(Progress("hard-judges", i, n, {"loss": loss})))
    report = {}
    for name, jitter in (("canonical", False), ("jittered", True)):
        held = render_scenes(images8, labels, s.judges_test_scenes, np.random.default_rng(s.seed + 100),
                             test_idx, jitter=jitter, layout=s.layout)
        report[f"heldout_adherence_{name}"] = adherence(judges, held.images, held.parts)
    if report["heldout_adherence_canonical"] < s.min_judge_adherence:
        raise ValueError(f"hard judges: held-out adherence {report['heldout_adherence_canonical']:.4f} < "
                         f"{s.min_judge_adherence}; raise judges_epochs or judges_scenes")
    report.update(train_scenes=s.judges_scenes, heldout_scenes=s.judges_test_scenes, epochs=s.judges_epochs,
                  seed=s.seed, layout=s.layout, train_s=round(time.time() - start, 1), device=device_name())
    save_judges(judges, s.judges_dir, report)
    return report


def pretrain_text(encoder: torch.nn.Module, tokenizer, images8: np.ndarray, labels: np.ndarray, s: HardToyConfig,
                  progress: ProgressFn | None = None, offset: int = 0, name: str = "sd15") -> dict | None:
    """CLIP pre-training of one text encoder (`text_pretrain_steps`; 0: none, and None is reported).
    The result is kept in `checkpoint_dir/text-NAME.pt` with its settings and the encoder's shapes: a
    resumed base run loads it instead of training again; other settings or another encoder (the SDXL
    family's share the folder) train afresh and replace it."""
    if s.text_pretrain_steps == 0:
        return None
    settings = {"steps": s.text_pretrain_steps, "pairs": s.text_pretrain_pairs, "lr": s.text_pretrain_lr,
                "seed": s.seed + 100 * offset, **({} if s.layout == "narrow" else {"layout": s.layout}),
                "shapes": {k: list(v.shape) for k, v in encoder.state_dict().items()}}
    ckpt = Path(s.checkpoint_dir) / f"text-{name}.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu")
        if saved["settings"] == settings:
            encoder.load_state_dict(saved["encoder"])
            encoder.to(s.device).eval().requires_grad_(False)
            return {**saved["report"], "resumed_from": str(ckpt)}
    report = pretrain_text_encoder(encoder, tokenizer, images8, labels, steps=s.text_pretrain_steps,
                                   pairs_per_batch=s.text_pretrain_pairs, lr=s.text_pretrain_lr,
                                   seed=settings["seed"], device=s.device, progress=progress, layout=s.layout)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"settings": settings, "encoder": encoder.state_dict(), "report": report}, ckpt)
    return report


def build_hard_base(s: HardToyConfig, progress: ProgressFn | None = None) -> dict:
    """Train VAE, UNet and text encoder (resumable, budgeted); save the last EMA as a pipeline in `base_dir`."""
    images8, labels = load_sklearn_digits()
    start = time.time()
    train = render_scenes(images8, labels, s.train_scenes, np.random.default_rng(s.seed + 7), layout=s.layout)
    vae_images = vae_training_images(train.images, s)
    vae = finetune_decoder(train_hard_vae(vae_images, s, progress), vae_images, s, progress)
    vae_s = time.time() - start
    latents = encode_latents(vae, train.images)
    vae.register_to_config(scaling_factor=unit_variance_scale(latents))
    latents = latents * vae.config.scaling_factor
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = hard_tokenizer(tmp)
    text_encoder = hard_text_encoder(tokenizer, s.seed)
    text_report = pretrain_text(text_encoder, tokenizer, images8, labels, s, progress)
    ids, uncond_ids = token_ids(tokenizer, train.captions), token_ids(tokenizer, [""])
    unet, text_encoder, step = train_hard_unet(latents, ids, uncond_ids, text_encoder, s, progress)
    pipe = assemble_hard_pipeline(vae, unet, text_encoder, tokenizer)
    folder = Path(s.base_dir)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    write_tokenizer_files(folder / "tokenizer", words=HARD_WORDS)
    # this run's wall time, and each phase's summed over resumed runs (None: a checkpoint from before they were kept)
    report = {"unet_steps": step, "vae_s": round(vae_s, 1), "wall_s": round(time.time() - start, 1),
              "vae_trained_s": trained_seconds(Path(s.checkpoint_dir) / "vae.pt"),
              "unet_trained_s": trained_seconds(Path(s.checkpoint_dir) / "last.pt"),
              "text_pretrain": text_report, "device": device_name(s.device), "torch": torch.__version__,
              "parameters": {n: sum(p.numel() for p in getattr(pipe, n).parameters())
                             for n in ("unet", "vae", "text_encoder")},
              "params": s.model_dump(mode="json")}
    (folder / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_hard_sdxl(s: HardToyConfig, progress: ProgressFn | None = None) -> dict:
    """Train the SDXL-family hard base around the SD-1.5 family's VAE (from `base_dir`); save to `sdxl_dir`."""
    from diffusers import AutoencoderKL

    from components.toy.hard.sdxl import (
        build_untrained_hard_sdxl,
        sdxl_training_set,
        train_hard_sdxl_unet,
    )

    images8, labels = load_sklearn_digits()
    start = time.time()
    vae = AutoencoderKL.from_pretrained(s.base_dir, subfolder="vae").eval().requires_grad_(False)
    images, add_time_ids, captions = sdxl_training_set(images8, labels, s.train_scenes,
                                                       np.random.default_rng(s.seed + 17), s.layout)
    latents = encode_latents(vae, images) * vae.config.scaling_factor
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_untrained_hard_sdxl(vae, tmp, s.seed)
    text_report = {name: pretrain_text(getattr(pipe, name), pipe.tokenizer, images8, labels, s, progress, offset,
                                       name=f"sdxl-{name}")
                   for offset, name in enumerate(("text_encoder", "text_encoder_2"))}
    ids = token_ids(pipe.tokenizer, captions)
    step = train_hard_sdxl_unet(pipe, latents, ids, add_time_ids, s, progress)
    folder = Path(s.sdxl_dir)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        write_tokenizer_files(folder / sub, words=HARD_WORDS)
    report = {"unet_steps": step, "wall_s": round(time.time() - start, 1),
              "unet_trained_s": trained_seconds(Path(s.checkpoint_dir) / "sdxl-last.pt"), "text_pretrain": text_report,
              "device": device_name(s.device),
              "torch": torch.__version__, "params": s.model_dump(mode="json")}
    (folder / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@torch.no_grad()
def _decoder_report(vae, held_out: torch.Tensor, layout: str, styles: list[str]) -> dict:
    """What the decoder shows: each hard style's strength through the VAE (`style_strength` the first
    style's, `style_strengths` all of them), and the plain scenes' MSE."""
    from components.toy.hard.style_metric import style_through_vae

    batch = held_out.to(vae.device)
    mse = float(torch.nn.functional.mse_loss(vae.decode(vae.encode(batch).latent_dist.mean).sample, batch))
    strengths = {style: style_through_vae(vae, layout=layout, style=style) for style in styles}
    return {"style_strength": strengths[styles[0]], "style_strengths": strengths, "heldout_plain_mse": mse}


def finetune_base_decoder(s: HardToyConfig, sdxl: bool = False, progress: ProgressFn | None = None) -> dict:
    """`python -m components.toy.hard decoder [--sdxl]`: fine-tune the decoder of the VAE saved in
    `base_dir` (`sdxl_dir` with `sdxl`) in place (`decoder_steps` of `decoder_lr`) on the base build's VAE
    images (same scenes and style share); its encoder, latents and UNet stay as they are. Writes
    `decoder.json` (before / after) beside the model."""
    from diffusers import AutoencoderKL

    folder = Path(s.sdxl_dir if sdxl else s.base_dir)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").to(s.device).eval()
    images8, labels = load_sklearn_digits()
    start = time.time()
    train = render_scenes(images8, labels, s.train_scenes, np.random.default_rng(s.seed + 7), layout=s.layout)
    held_out = render_scenes(images8, labels, 200, np.random.default_rng(s.seed + 900), layout=s.layout).images
    before = _decoder_report(vae, held_out, s.layout, s.decoder_styles)
    vae = finetune_decoder(vae, vae_training_images(train.images, s), s, progress)
    after = _decoder_report(vae, held_out, s.layout, s.decoder_styles)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    config = folder / "vae" / "config.json"  # from_pretrained recorded where it was loaded from: not part of the model
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "_name_or_path"},
                                 indent=2, sort_keys=True) + "\n")
    report = {"folder": str(folder), "before": before, "after": after, "wall_s": round(time.time() - start, 1),
              "device": device_name(s.device), "torch": torch.__version__,
              "params": {k: getattr(s, k) for k in ("decoder_steps", "decoder_lr", "vae_batch_size", "style_fraction",
                                                   "decoder_styles", "train_scenes", "seed")}}
    (folder / "decoder.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

