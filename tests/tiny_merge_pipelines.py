"""Tiny random-init pipelines of both families, and random LoRAs for them, for the LoRA reading,
merge and single-file tests.

Self-contained so that these tests depend only on diffusers, transformers and peft. Tests that compare
module outputs feed token ids directly; `tiny_sd15(tokenizer_dir=...)` adds a byte-level CLIP
tokenizer for tests that sample from prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from components.evaluate.judges import Judges
from components.lora import io as lora_io
from components.lora.formats import LORA_WEIGHT_NAME

MAX_TOKENS = 32  # prompt length in tokens (one per character)
VOCAB = 514  # 256 byte symbols, the same at word ends (</w>), <|startoftext|>, <|endoftext|>


def byte_tokenizer(folder):
    """A CLIP BPE tokenizer with one token per byte and no merges, written to `folder`."""
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(
        [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"])}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS,
                         pad_token="<|endoftext|>")


def _text_encoder(width: int, seed: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=16,
                            bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16)


def tiny_sd15(seed: int = 0, widths: tuple[int, int] = (16, 32), tokenizer_dir=None):
    """SD-1.5 family: 2 UNet levels (cross-attention down, plain down), conv projections, 16-wide CLIP."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    tokenizer = byte_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    return StableDiffusionPipeline(vae=_vae(seed + 1), text_encoder=_text_encoder(16, seed + 2), tokenizer=tokenizer,
                                   unet=unet, scheduler=LCMScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def tiny_sdxl(seed: int = 0, widths: tuple[int, int] = (16, 24)):
    """SDXL family: two CLIP encoders (the second with a projection; different widths, as in SDXL, so
    single-file loaders can tell them apart), text_time conditioning, linear projections."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=sum(widths), norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4)
    return StableDiffusionXLPipeline(vae=_vae(seed + 1), text_encoder=_text_encoder(widths[0], seed + 2),
                                     text_encoder_2=_text_encoder(widths[1], seed + 3, projection=True),
                                     tokenizer=None, tokenizer_2=None, unet=unet,
                                     scheduler=EulerDiscreteScheduler(steps_offset=1))


# --- random LoRAs ---------------------------------------------------------------------


WEIGHTS = (0.8, 1.0)  # (l1, l2), the report's choice
STYLE_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
LCM_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "ff.net.2"]


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
    return path / LORA_WEIGHT_NAME


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


def make_loras(root: Path) -> dict[str, Path]:
    """A style LoRA (UNet + text encoder, alpha != rank) in peft and kohya format and an LCM-LoRA folder."""
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
    """Variant 1: both LoRAs loaded as diffusers runtime adapters at (l1, l2) = weights."""
    pipe = tiny_sd15()
    lora_io.load_adapter(pipe, "sd15", style, "style")
    lora_io.load_adapter(pipe, "sd15", lcm, "lcm")
    lora_io.set_weights(pipe, {"style": weights[0], "lcm": weights[1]})
    return pipe


# --- judges ----------------------------------------------------------------------------


def pooled_colours(images: torch.Tensor) -> torch.Tensor:
    """A small feature backbone: 4x4 average-pooled colours (the toy uses the digit classifier's)."""
    return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)


def tiny_judges(style: Any = None, style_name: str = "") -> Judges:
    """Pooled-colour features, constant adherence 1.0, and the given style scorer."""
    return Judges(pooled_colours, "pooled colours", lambda images, prompts: 1.0, "constant",
                  torch.zeros(2, 3, 16, 16), style, style_name)
