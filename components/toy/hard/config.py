"""Settings of the hard toy world (frozen pydantic), defaults sized for one CPU thread.

`lcmlora toy base --hard` reads them from params' `toy.hard` mapping (`--set toy.hard.KEY=VALUE`);
`python -m components.toy.hard` from bare `--set KEY=VALUE` pairs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from components.config import Params
from components.toy.config import toy_config, validate_section

FAMILIES = {"sd15": "toy-hard", "sdxl": "toy-hard-xl"}  # hard family -> the params base it runs on


class HardToyConfig(BaseModel):
    """Every number the hard toy's builders use; `python -m components.toy.hard ... --set k=v` overrides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0  # seeds scenes, splits and training
    judges_dir: str = "data/toy/hard/judges"  # where the judges are written (committed)
    base_dir: str = "data/toy/hard/base"  # where the SD-1.5-family hard base is written (committed)
    sdxl_dir: str = "data/toy/hard/sdxl"  # where the SDXL-family hard base is written (committed)
    source_dir: str = "data/toy/hard/source"  # where the hard source is written (not committed)
    source_rows: int = 2000  # scenes in the hard source before duplicates
    layout: Literal["narrow", "wide"] = "narrow"  # where digits sit in every render (render.py:render_scene):
    # narrow (the committed judges and bases) or wide (any place and 18-26 px in its half: session 10's trial)
    look_fraction: float = Field(0.0, ge=0.0, le=1.0)  # share of the source drawn on other papers than the
    # plain one (render.random_look; never the hard style's): what the LCM-LoRA is distilled on (docs/toy-hard.md)
    judges_scenes: int = 4000  # training scenes for the judges
    judges_epochs: int = 12  # judge training epochs
    judges_test_scenes: int = 1000  # held-out scenes (held-out digit images) for the judge check
    min_judge_adherence: float = 0.95  # judges must read all four parts of real renders this often
    train_scenes: int = 12000  # rendered scenes the base is trained on
    vae_steps: int = 600  # VAE training steps
    vae_batch_size: int = 32  # VAE batch
    vae_lr: float = 1.0e-3  # VAE peak learning rate (one-cycle)
    kl_weight: float = 1.0e-4  # weight of the VAE's KL term (per latent element)
    decoder_steps: int = Field(400, ge=0)  # decoder-only fine-tune after the VAE phase (encoder frozen, so the
    # latents and everything trained on them stay valid: sd-vae-ft-mse's way); 0: none. Session 7: 400 steps lift
    # the hard style the decoder shows from 0.33 to 0.94 (`python -m components.toy.hard decoder`, docs/toy-hard.md)
    decoder_lr: float = 1.0e-3  # AdamW learning rate of the decoder fine-tune
    train_steps: int = 6000  # UNet training steps (the wall-clock budget may stop it earlier)
    batch_size: int = 64  # UNet batch
    lr: float = 1.0e-3  # UNet peak learning rate (warm-up, cosine to 10%)
    warmup_steps: int = 200  # UNet learning-rate warm-up steps
    text_pretrain_steps: int = Field(600, ge=0)  # CLIP steps for each text encoder before the UNet
    # (components/toy/hard/text_pretrain.py); 0: none, the text encoder starts random (the session-5 bases)
    text_pretrain_pairs: int = Field(128, ge=1)  # scenes per CLIP batch, each with its mirror
    text_pretrain_lr: float = 1.0e-3  # AdamW learning rate of the CLIP pre-training
    text_frozen: bool = True  # the UNet trains against the text encoder(s) frozen (SD's way); False: jointly
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    ema_decay: float = 0.999  # EMA of the UNet weights (what is evaluated and saved)
    eval_every: int = 500  # steps between DDIM-50 CFG adherence checks of the EMA (best kept)
    eval_samples: int = 100  # samples per check during training
    guidance_scale: float = 5.0  # the hard base's own CFG scale (real-SD-like)
    budget_s: float = 4800.0  # wall-clock budget of the UNet phase; training stops (and keeps the best) past it
    checkpoint_dir: str = "/tmp/h5_hard_ckpt"  # resumable checkpoints (VAE, UNet, EMA, optimizer)
    threads: int = 1  # torch CPU threads
    device: str = "cpu"  # torch device
    final_samples: int = 200  # samples per sampler/step count in the difficulty table
    final_guidance_scales: list[float] = Field(default_factory=lambda: [3.0, 5.0, 7.5])  # adherence table
    # the merge claim (docs/toy-hard.md, "Merge claim"): the hard style set and its style LoRA
    style_fraction: float = Field(0.0, ge=0.0, le=1.0)  # styled scenes added to the VAE's training set, as a
    # share of train_scenes; 0 keeps the VAE plain, and a plain VAE cannot draw the style (0.25: the easy toy's)
    style: str = "blue-ruled"  # the hard style of the style set, its LoRA and the merge claim (style.py:STYLES:
    # blue-ruled, sepia-grid); any other than blue-ruled moves style_dir and style_output to NAME-suffixed folders
    decoder_styles: list[str] = Field(default_factory=lambda: ["blue-ruled"])  # styles the VAE (and a decoder
    # fine-tune) sees, style_fraction of train_scenes each; the committed bases: blue-ruled alone
    style_dir: str = "data/toy/hard/style"  # where `lcmlora toy style --hard` writes the hard style set
    style_count: int = 2000  # scenes in the hard style set
    style_output: str = "data/toy/hard/style_lora"  # where `lcmlora toy style-lora --hard` writes the LoRA
    style_rank: int = 8  # LoRA rank (session 6: 16 on the 3-level UNet is 3.0 MB in its two formats, which
    # would take the hard toy's data past its 20 MB; 8 is 1.5 MB)
    style_alpha: float = 8.0  # LoRA alpha (= rank; session 5's rank 16, alpha 8 drew the style weakly: 0.32)
    style_steps: int = 1500  # optimizer steps
    style_batch_size: int = 64  # images per step
    style_lr: float = 2.0e-3  # AdamW learning rate
    style_seed: int = 0  # scenes, data order, noise, init
    style_eval_images: int = 80  # DPM-Solver++-25 samples (hard prompts in turn) scored with and without the LoRA

    @model_validator(mode="before")
    @classmethod
    def _another_styles_folders(cls, values: Any) -> Any:
        """A style other than blue-ruled moves the style set and LoRA folders not named to NAME-suffixed ones,
        so that a second style's set and LoRA never overwrite (or are refused as) blue-ruled's."""
        if not isinstance(values, dict) or values.get("style", "blue-ruled") == "blue-ruled":
            return values
        moved = {key: f"{cls.model_fields[key].default}-{values['style']}" for key in ("style_dir", "style_output")
                 if key not in values}
        return {**values, **moved}

    @model_validator(mode="after")
    def _styles_known(self) -> HardToyConfig:
        from components.toy.hard.style import hard_style

        for name in [self.style, *self.decoder_styles]:
            hard_style(name)
        return self


def hard_toy_config(params: Params) -> HardToyConfig:
    """The `toy.hard` mapping of resolved params as a HardToyConfig; ConfigError names each bad `toy.hard.KEY`."""
    return validate_section(HardToyConfig, toy_config(params).hard, "toy.hard")
