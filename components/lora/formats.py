"""LoRA file formats: diffusers/peft (`pytorch_lora_weights.safetensors`) and kohya (ComfyUI/A1111).

Both files describe the same update Delta W = (alpha / r) B A per module:
- diffusers/peft: `unet.MODULE.lora_A.weight` (A, r x in), `unet.MODULE.lora_B.weight` (B, out x r),
  and safetensors metadata `lora_adapter_metadata` holding the LoraConfig (r, lora_alpha,
  target_modules, rank/alpha patterns). Without that metadata diffusers assumes alpha = r.
- kohya: `lora_unet_MODULE_WITH_UNDERSCORES.lora_down.weight` (A), `.lora_up.weight` (B) and
  `.alpha` (a scalar per module), with `ss_*` and `modelspec.*` metadata. Module names follow
  diffusers' UNet (kohya's SD-1.x convention), which diffusers, ComfyUI and A1111 all map.

`read_lora_file` reads either format (also old diffusers `lora.down`/attention-processor keys
and kohya files with SGM `input_blocks` names) back into peft keys and per-module alphas.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as _save_file

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the packed LoraConfig

_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
_KOHYA_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2"}
# Underscored module-name tokens that are one diffusers/transformers name (kohya drops the dots).
_COMPOUND_NAMES = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "linear_1", "linear_2", "text_model", "self_attn", "q_proj",
    "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "add_k_proj",
    "add_v_proj", "text_projection",
)
_FAMILY_ARCH = {"sd15": ("sd_v1", "stable-diffusion-v1"), "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base")}


class LoraFormatError(ValueError):
    """A LoRA file whose keys or metadata cannot be read as diffusers/peft or kohya."""


class UnreadableLoraFile(LoraFormatError):
    """Not a readable safetensors file: truncated, overwritten with garbage, or another format."""


# --- key conversion ----------------------------------------------------------------------------


def split_peft_key(key: str) -> tuple[str, str, str]:
    """`unet.MODULE.lora_A.weight` -> ("unet", "MODULE", "A"); a key without component prefix is the UNet's."""
    m = re.fullmatch(r"(?:(unet|text_encoder|text_encoder_2)\.)?(.+)\.lora_([AB])\.weight", key)
    if not m:
        raise LoraFormatError(f"{key}: not a peft LoRA key (MODULE.lora_A.weight / MODULE.lora_B.weight)")
    return m.group(1) or "unet", m.group(2), m.group(3)


def module_to_kohya(component: str, module: str) -> str:
    """(`unet`, `down_blocks.0.attentions.0.proj_in`) -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return f"{_KOHYA_PREFIX[component]}_{module.replace('.', '_')}"


def kohya_to_module(name: str) -> tuple[str, str]:
    """`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` -> (`unet`, `down_blocks.0....to_out.0`)."""
    m = re.fullmatch(r"(lora_unet|lora_te1|lora_te2|lora_te)_(.+)", name)
    if not m:
        raise LoraFormatError(f"{name}: not a kohya LoRA module name (lora_unet_..., lora_te1_..., lora_te2_...)")
    dotted = m.group(2).replace("_", ".")
    for compound in _COMPOUND_NAMES:
        dotted = re.sub(rf"(?<![^.]){re.escape(compound.replace('_', '.'))}(?![^.])", compound, dotted)
    return _KOHYA_COMPONENT[m.group(1)], dotted


def to_kohya(state_dict: dict[str, torch.Tensor], alpha: float | dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """peft/diffusers LoRA state dict -> kohya state dict with a per-module `alpha`, and its `ss_network_*` metadata.

    `alpha` is the trained lora_alpha: one number, or a dict `component.MODULE` / `MODULE` -> alpha.
    """
    out: dict[str, torch.Tensor] = {}
    ranks: set[int] = set()
    alphas: set[float] = set()
    for key, tensor in state_dict.items():
        component, module, ab = split_peft_key(key)
        name = module_to_kohya(component, module)
        out[f"{name}.{'lora_down' if ab == 'A' else 'lora_up'}.weight"] = tensor.contiguous()
        if ab == "A":
            a = _alpha_for(alpha, component, module)
            out[f"{name}.alpha"] = torch.tensor(float(a), dtype=tensor.dtype)
            ranks.add(int(tensor.shape[0]))
            alphas.add(float(a))
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": _fmt(alphas.pop()) if len(alphas) == 1 else "Dynamic",
    }
    return out, meta


def _alpha_for(alpha: float | dict[str, float], component: str, module: str) -> float:
    if not isinstance(alpha, dict):
        return float(alpha)
    for key in (f"{component}.{module}", module):
        if key in alpha:
            return float(alpha[key])
    raise LoraFormatError(f"{component}.{module}: no alpha given for this module")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# --- writing ----------------------------------------------------------------------------------


def peft_adapter_metadata(state_dict: dict[str, torch.Tensor], alpha: float | dict[str, float], component: str = "unet") -> dict[str, Any]:
    """The LoraConfig kwargs diffusers rebuilds the adapter from (exact module paths, rank/alpha patterns)."""
    ranks, alphas = {}, {}
    for key, tensor in state_dict.items():
        comp, module, ab = split_peft_key(key)
        if comp == component and ab == "A":
            ranks[module] = int(tensor.shape[0])
            alphas[module] = _alpha_for(alpha, comp, module)
    if not ranks:
        return {}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    a = max(set(alphas.values()), key=list(alphas.values()).count)
    return {
        "r": r,
        "lora_alpha": a,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != a},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
    }


def kohya_metadata(base_meta: dict[str, Any], title: str, network_meta: dict[str, str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """`ss_*` (kohya sd-scripts) and `modelspec.*` (Stability's model spec 1.0) metadata naming the base."""
    family = base_meta.get("family", "sd15")
    version, arch = _FAMILY_ARCH.get(family, _FAMILY_ARCH["sd15"])
    res = int(base_meta.get("resolution", 512))
    prediction = base_meta.get("prediction_type") or "epsilon"
    meta = {
        **network_meta,
        "ss_base_model_version": version,
        "ss_sd_model_name": str(base_meta.get("name", base_meta.get("reference", "unknown"))),
        "ss_sd_model_hash": str(base_meta.get("fingerprint", "")),
        "ss_v2": "False",
        "ss_resolution": f"({res}, {res})",
        "ss_output_name": title,
        "ss_training_comment": "LCM-LoRA by Latent Consistency Distillation (arXiv 2311.05556); recommended: LCMScheduler, 4 steps, guidance 1.0",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
        "modelspec.description": f"LCM-LoRA acceleration vector for {base_meta.get('name', 'the base')} ({family})",
    }
    meta.update(extra or {})
    return meta


def save_lora(
    folder: str | Path,
    unet_lora_state_dict: dict[str, torch.Tensor],
    *,
    rank: int,
    alpha: float | dict[str, float],
    base_meta: dict[str, Any],
    text_encoder_state_dicts: dict[str, dict[str, torch.Tensor]] | None = None,
    title: str | None = None,
    weight_name: str = LORA_WEIGHT_NAME,
    kohya_name: str | None = KOHYA_WEIGHT_NAME,
    extra_metadata: dict[str, str] | None = None,
    shared_metadata: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write the diffusers/peft file (with its LoraConfig metadata) and the kohya file; returns their paths.

    `unet_lora_state_dict`: peft keys `MODULE.lora_A.weight` (with or without `unet.`);
    `text_encoder_state_dicts`: optional {"text_encoder" | "text_encoder_2": peft state dict};
    `alpha`: the trained lora_alpha (one number or per module); `base_meta`: name, family,
    resolution, prediction_type, fingerprint, reference of the base; `extra_metadata`: kohya keys
    (`ss_steps`, ...); `shared_metadata`: keys both files carry (e.g. `lcmlora.objective`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    parts = {"unet": unet_lora_state_dict, **(text_encoder_state_dicts or {})}
    packed_meta: dict[str, Any] = {}
    for component, sd in parts.items():
        for key, tensor in sd.items():
            _, module, ab = split_peft_key(key)
            tensors[f"{component}.{module}.lora_{ab}.weight"] = tensor.detach().to("cpu").contiguous()
        component_meta = peft_adapter_metadata({f"{component}.{k.removeprefix(component + '.')}": v for k, v in sd.items()}, alpha, component)
        packed_meta.update({f"{component}.{k}": v for k, v in component_meta.items()})
    found_ranks = {int(t.shape[0]) for k, t in tensors.items() if k.endswith("lora_A.weight")}
    if rank not in found_ranks:
        raise LoraFormatError(f"save_lora: rank={rank} but the state dict has ranks {sorted(found_ranks)}")
    title = title or f"{base_meta.get('name', 'base')}-lcm-lora"
    meta = {"format": "pt", METADATA_KEY: json.dumps(packed_meta, sort_keys=True),
            "lcmlora.base": json.dumps(base_meta, sort_keys=True, default=str), **(shared_metadata or {})}
    paths = {"diffusers": folder / weight_name}
    save_file(tensors, str(paths["diffusers"]), metadata=meta)
    if kohya_name:
        kohya_sd, network_meta = to_kohya(tensors, alpha)
        paths["kohya"] = folder / kohya_name
        save_file(kohya_sd, str(paths["kohya"]), metadata=kohya_metadata(base_meta, title, network_meta,
                                                                           {**(extra_metadata or {}), **(shared_metadata or {})}))
    return paths


# --- writing the same bytes for the same content ---------------------------------------------


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, then its header with the metadata and tensor entries in sorted order.

    safetensors keeps the metadata in a Rust HashMap and writes it in a random order per process, so
    the same tensors and metadata give a different file (and sha256) each run; a LoRA republished
    from the same weights would look new. The data section is untouched (offsets are relative to it).
    """
    _save_file(tensors, str(path), metadata=metadata)
    sort_header(path)


def sort_header(path: str | Path) -> None:
    """Rewrite a safetensors header with `__metadata__` first, then both maps sorted by key."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | dict(sorted(header.items()))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # same content, same length: pad as safetensors does (spaces) and write in place
            f.seek(8)
            f.write(text + b" " * (size - len(text)))
            return
        data = f.read()
        text += b" " * (-(8 + len(text)) % 8)
        f.seek(0)
        f.write(len(text).to_bytes(8, "little") + text + data)
        f.truncate()


# --- reading ----------------------------------------------------------------------------------


def _unreadable(path: str | Path, err: Exception) -> UnreadableLoraFile:
    return UnreadableLoraFile(f"{path}: not a readable .safetensors file ({err}); it is truncated or not "
                              "safetensors at all: copy, download or export it again")


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file (reads the header only: a cheap validity check)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as err:
        raise _unreadable(path, err) from None


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a safetensors file; UnreadableLoraFile names a corrupt one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (safe_open)
    except SafetensorError as err:
        raise _unreadable(path, err) from None


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"{path}: only .safetensors LoRA files are read (pickle formats are refused)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    return read_safetensors(path)


_OLD_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_OLD_LINEAR = re.compile(r"(.+?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight")


def _normalise_peft_key(key: str) -> str:
    """Old diffusers spellings (`lora.down`, `lora_linear_layer.up`, attention processors) -> peft `lora_A/B`."""
    if ".lora_A." in key or ".lora_B." in key:
        return key
    m = _OLD_PROCESSOR.fullmatch(key)
    if m:
        module = f"{m.group(1)}.{m.group(2)}" + (".0" if m.group(2) == "to_out" else "")
        return f"{module}.lora_{'A' if m.group(3) == 'down' else 'B'}.weight"
    m = _OLD_LINEAR.fullmatch(key)
    if m:
        return f"{m.group(1)}.lora_{'A' if m.group(2) == 'down' else 'B'}.weight"
    raise LoraFormatError(f"{key}: unknown LoRA key format (expected peft lora_A/lora_B, diffusers lora.down/up, or kohya lora_down/lora_up)")


def _read_kohya(tensors: dict[str, torch.Tensor], unet_config: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    if any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block")) for k in tensors):
        if unet_config is None:
            raise LoraFormatError("kohya file with SGM/LDM block names (input_blocks/output_blocks): pass unet_config= "
                                  "(the base's unet/config.json) so the blocks can be mapped to diffusers names")
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        tensors = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), unet_config)
        tensors = {_sgm_inner_names(k): v for k, v in tensors.items()}
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            if suffix == "dora_scale":
                raise LoraFormatError(f"{key}: DoRA kohya files are not supported")
            raise LoraFormatError(f"{key}: unknown kohya key (expected .lora_down.weight, .lora_up.weight or .alpha)")
        component, module = kohya_to_module(name)
        if suffix == "alpha":
            alphas[f"{component}.{module}"] = float(tensor.item())
        else:
            out[f"{component}.{module}.lora_{'A' if suffix == 'lora_down.weight' else 'B'}.weight"] = tensor
    for key, tensor in out.items():
        component, module, ab = split_peft_key(key)
        if ab == "A":
            alphas.setdefault(f"{component}.{module}", float(tensor.shape[0]))  # kohya: no alpha means alpha = rank
    return out, alphas


def _sgm_inner_names(key: str) -> str:
    """SGM resnet/sampler names inside diffusers blocks -> diffusers names (in_layers_2 -> conv1, ...)."""
    for old, new in (("_in_layers_2", "_conv1"), ("_out_layers_3", "_conv2"), ("_emb_layers_1", "_time_emb_proj"),
                     ("_skip_connection", "_conv_shortcut"), ("samplers_0_op", "samplers_0_conv")):
        key = key.replace(old, new)
    return key


def read_lora_file(path: str | Path, unet_config: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Read a diffusers/peft or kohya LoRA file -> (`component.MODULE.lora_A/B.weight` tensors, {`component.MODULE`: alpha}).

    The effective update of each module is (alpha / r) B A. For peft files alpha comes from
    the `lora_adapter_metadata` (lora_alpha and alpha_pattern); a peft file without it gets
    alpha = r, as diffusers assumes.
    """
    path = Path(path)
    tensors, meta = _load_safetensors(path)
    if not tensors:
        raise LoraFormatError(f"{path}: no tensors")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in tensors):
        return _read_kohya(tensors, unet_config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        norm = _normalise_peft_key(key)
        component, module, ab = split_peft_key(norm)
        out[f"{component}.{module}.lora_{ab}.weight"] = tensor
    packed = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
    alphas: dict[str, float] = {}
    for key, tensor in out.items():
        component, module, ab = split_peft_key(key)
        if ab != "A":
            continue
        pattern = packed.get(f"{component}.alpha_pattern") or {}
        if module in pattern:
            alphas[f"{component}.{module}"] = float(pattern[module])
        elif f"{component}.lora_alpha" in packed:
            alphas[f"{component}.{module}"] = float(packed[f"{component}.lora_alpha"])
        else:
            alphas[f"{component}.{module}"] = float(tensor.shape[0])
    return out, alphas


def lora_delta(state_dict: dict[str, torch.Tensor], alphas: dict[str, float], module: str) -> torch.Tensor:
    """Delta W = (alpha / r) B A of one module (`component.MODULE`), reshaped like the base weight for convs."""
    a = state_dict[f"{module}.lora_A.weight"].float()
    b = state_dict[f"{module}.lora_B.weight"].float()
    scale = alphas[module] / a.shape[0]
    if a.ndim == 4:  # conv: A is r x in x kh x kw, B is out x r x 1 x 1
        return scale * torch.einsum("or,rikl->oikl", b.flatten(1), a)
    return scale * (b @ a)
