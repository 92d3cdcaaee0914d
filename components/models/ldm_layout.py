"""diffusers -> original single-file (LDM/SGM) checkpoint layout, for A1111, ComfyUI and `from_single_file`.

The inverse of diffusers' own single-file converters (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`),
written per key from the module's config, so tiny and real architectures alike map:

- UNet under `model.diffusion_model.`: `down_blocks.b.resnets.j` -> `input_blocks.(1 + b(L+1) + j).0`,
  attentions -> `.1`, downsamplers -> `input_blocks.(1 + b(L+1) + L).0.op`; `mid_block` ->
  `middle_block.0/1/2`; `up_blocks.b.resnets.j` -> `output_blocks.(b(L+1) + j).0`, upsamplers ->
  `.1.conv` or `.2.conv` after an attention; resnet parts `norm1 -> in_layers.0`, `conv1 -> in_layers.2`,
  `time_emb_proj -> emb_layers.1`, `norm2 -> out_layers.0`, `conv2 -> out_layers.3`,
  `conv_shortcut -> skip_connection` (L = layers_per_block).
- VAE under `first_stage_model.`: `down_blocks.i.resnets.j -> down.i.block.j`, decoder up blocks
  reversed (`up_blocks.i -> up.(n-1-i)`), mid attention as 1x1 convs `q, k, v, proj_out`.
- CLIP text encoder: SD-1.x `cond_stage_model.transformer.text_model.*`; SDXL
  `conditioner.embedders.0.transformer.text_model.*` and the second (OpenCLIP) encoder under
  `conditioner.embedders.1.model.*` with q, k, v packed into `in_proj_weight`.
`tests/test_ldm_layout.py` checks that diffusers' converters give back every tensor exactly.
"""

from __future__ import annotations

import re
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = {"sd15": {"text_encoder": "cond_stage_model.transformer."},
               "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.",
                        "text_encoder_2": "conditioner.embedders.1.model."}}

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
}
_UNET_SIDES = {"down": ("input_blocks", 1), "up": ("output_blocks", 0)}  # LDM list, block 0's index
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
_VAE_SAMPLER = {"encoder.down": ("downsamplers", "downsample"), "decoder.up": ("upsamplers", "upsample")}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class LayoutError(ValueError):
    """A diffusers key this layout does not know how to place."""


def _resnet_part(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET:
        raise LayoutError(f"unet resnet part {rest!r}: expected one of {sorted(_RESNET)}")
    return f"{_RESNET[head]}.{tail}"


def _side_block(side: str, block: int, part: int, per_block: int) -> str:
    """LDM block of part `part` of diffusers `{side}_blocks.{block}`: each block spans L + 1 LDM
    blocks (L resnets with their attentions, then its sampler), input_blocks after conv_in."""
    blocks, first = _UNET_SIDES[side]
    return f"{blocks}.{first + block * (per_block + 1) + part}"


def unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """One diffusers UNet state-dict key -> its LDM key (without `model.diffusion_model.`)."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise LayoutError(f"unet layers_per_block={per_block!r}: only one int for every block is supported")
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        part = f"0.{_resnet_part(m[5])}" if m[3] == "resnets" else f"1.{m[5]}"
        return f"{_side_block(m[1], int(m[2]), int(m[4]), per_block)}.{part}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.\1samplers\.0\.conv\.(.+)", key):
        place = _side_block(m[1], int(m[2]), per_block, per_block)
        if m[1] == "down":
            return f"{place}.0.op.{m[3]}"
        # An up block's upsampler follows its resnet and, in a cross-attention block, the attention.
        has_attention = "CrossAttn" in config["up_block_types"][int(m[2])]
        return f"{place}.{2 if has_attention else 1}.conv.{m[3]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_part(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    raise LayoutError(f"unet key {key!r}: no place in the LDM layout")


def vae_key_to_ldm(key: str, value: torch.Tensor, config: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """One diffusers VAE key -> (LDM key without `first_stage_model.`, tensor; attention linears as 1x1 convs)."""
    n_up = len(config["up_block_types"])
    module, _, leaf = key.rpartition(".")
    if module in _VAE_TOP:
        return f"{_VAE_TOP[module]}.{leaf}", value
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
        if m[2] not in _VAE_ATTENTION:
            raise LayoutError(f"vae key {key!r}: unknown mid-block attention part")
        if value.ndim == 2:
            value = value[:, :, None, None]
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{leaf}", value
    key = key.replace("conv_shortcut", "nin_shortcut")
    if m := re.fullmatch(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(.+)", key):
        # The decoder's up blocks run the other way in the LDM layout: up_blocks.i is up.(n-1-i).
        place = f"{m[1]}.{int(m[2]) if m[1] == 'encoder.down' else n_up - 1 - int(m[2])}"
        sampler, ldm_sampler = _VAE_SAMPLER[m[1]]
        if r := re.fullmatch(r"resnets\.(\d+)\.(.+)", m[3]):
            return f"{place}.block.{r[1]}.{r[2]}", value
        if r := re.fullmatch(rf"{sampler}\.0\.conv\.(.+)", m[3]):
            return f"{place}.{ldm_sampler}.conv.{r[1]}", value
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", value
    return key, value  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def clip_state_dict_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys -> `text_model.*` keys (transformers 5 drops that level)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection (SDXL's second encoder) -> OpenCLIP keys."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    out["token_embedding.weight"] = state["embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state["final_layer_norm.weight"]
    out["ln_final.bias"] = state["final_layer_norm.bias"]
    out["text_projection"] = state["text_projection.weight"].T.contiguous()
    return out


def pipeline_to_ldm(pipe: Any, family: str) -> dict[str, torch.Tensor]:
    """A whole SD-1.x / SDXL pipeline as one original-layout state dict (UNet, VAE, text encoder(s))."""
    out: dict[str, torch.Tensor] = {}
    unet_config = dict(pipe.unet.config)
    for key, value in pipe.unet.state_dict().items():
        out[UNET_PREFIX + unet_key_to_ldm(key, unet_config)] = value
    vae_config = dict(pipe.vae.config)
    for key, value in pipe.vae.state_dict().items():
        ldm_key, ldm_value = vae_key_to_ldm(key, value, vae_config)
        out[VAE_PREFIX + ldm_key] = ldm_value
    prefixes = TEXT_PREFIX[family]
    for key, value in clip_state_dict_to_ldm(pipe.text_encoder.state_dict()).items():
        if not key.endswith("position_ids"):
            out[prefixes["text_encoder"] + key] = value
    if family == "sdxl":
        for key, value in open_clip_state_dict(pipe.text_encoder_2.state_dict()).items():
            out[prefixes["text_encoder_2"] + key] = value
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
