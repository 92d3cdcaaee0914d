"""Reading LoRA files of any format, as diffusers reads them, and checking them against a base.

A style LoRA arrives in whatever format its author used: diffusers/peft, kohya (ComfyUI/A1111,
per-module alphas, SGM block names for SDXL) or the old diffusers attn-processor layout. Every
LoRA is read the way diffusers reads it: it is loaded as a peft adapter (`load_adapter`) and its
factors are read back from the injected layers (`adapter_factors`), so every merge variant is
built from exactly what the runtime adapters run. Before anything is loaded the file is checked
against the base (`check_compatible`): another family's LoRA, a shape mismatch or an unknown key
format raise a `LoraIncompatible` error naming the module, instead of diffusers' silent skip or a
deep `size mismatch`. Text-encoder layers are kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from components.lora.factors import (
    COMPONENTS,
    LoraFactor,
    LoraFactors,
    module_shape,
    peft_state_dict,
)
from components.lora.formats import LORA_WEIGHT_NAME, read_metadata, read_safetensors
from components.models.base_model import refuse_pickle

# Cross-attention width of attn2.to_k / to_v inputs, by family: tells which base a LoRA was made for.
_CROSS_ATTENTION_FAMILY = {768: "sd15", 1024: "sd2", 2048: "sdxl"}
# First names of UNet modules: an un-prefixed key starting with one is an old attn-processor file.
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")


class LoraIncompatible(ValueError):
    """A LoRA that cannot be applied to this base; the message names the module and what to do."""


class WrongFamily(LoraIncompatible):
    """The LoRA was made for another base family (e.g. an SDXL LoRA on an SD-1.5 base)."""


class LoraShapeMismatch(LoraIncompatible):
    """A LoRA module's factors do not fit the base module's weight."""


class UnknownLoraFormat(LoraIncompatible):
    """Keys that no supported format (peft, diffusers, kohya, attn-processor) explains."""


# --- 0. locating and reading files ------------------------------------------------------


def lora_file(path: str | Path) -> Path:
    """The safetensors file of a LoRA given as a file or a contract-4 folder; pickles refused.

    Its header is read here, so a truncated or garbage file fails, named, before any base loads.
    """
    path = Path(path)
    refuse_pickle(path)
    if path.is_dir():
        candidate = path / LORA_WEIGHT_NAME
        if not candidate.exists():
            raise FileNotFoundError(f"{path}: LoRA folder without {LORA_WEIGHT_NAME}")
        path = candidate
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    elif path.suffix != ".safetensors":
        raise UnknownLoraFormat(f"{path}: LoRAs are read from .safetensors files only (got {path.suffix or 'no suffix'})")
    read_metadata(path)
    return path


def _needs_unet_prefix(keys: Iterable[str]) -> bool:
    """True for the old diffusers attn-processor format: UNet keys without the `unet.` prefix."""
    keys = list(keys)
    return bool(keys) and all(k.startswith(_UNET_ROOTS) for k in keys)


def diffusers_state_dict(pipe: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, bool]:
    """The file normalized by diffusers' own `lora_state_dict` (kohya, SGM blocks, attn-processor).

    Returns (state dict with `unet.` / `text_encoder.` / `text_encoder_2.` keys, network alphas
    or None, whether the raw file needed the `unet.` prefix added).
    """
    raw, _ = read_safetensors(path)
    if not raw:
        raise UnknownLoraFormat(f"{path}: the file holds no tensors")
    prefixed = _needs_unet_prefix(raw)
    if prefixed:
        raw = {f"unet.{k}": v for k, v in raw.items()}
    dora = sorted(k for k in raw if "dora_scale" in k or "lora_magnitude_vector" in k)
    if dora:
        raise UnknownLoraFormat(f"{path}: DoRA keys ({dora[0]}, ...) are not supported; use a plain LoRA")
    try:
        state_dict, alphas = type(pipe).lora_state_dict(dict(raw), unet_config=pipe.unet.config)
    except ValueError as err:
        raise UnknownLoraFormat(f"{path}: diffusers cannot read its keys: {str(err).strip()[:400]}") from None
    return state_dict, alphas, prefixed


# --- 1. keys in peft form, factors, compatibility checks ---------------------------------


def _te_original_type(keys: Iterable[str]):
    """diffusers guesses the old `to_q_lora.down` layout only when a `to_out_lora` key exists; say it."""
    from diffusers.utils.state_dict_utils import StateDictType

    return StateDictType.DIFFUSERS_OLD if any(re.search(r"_lora\.(down|up)\.", k) for k in keys) else None


def _component_peft_keys(component: str, state_dict: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One component's keys in peft form (`<module>.lora_A.weight`), as diffusers converts them."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    own = {k.removeprefix(f"{component}."): v for k, v in state_dict.items() if k.split(".")[0] == component}
    if not own:
        return {}
    if component == "unet":
        return own if "lora_A" in next(iter(own)) else convert_unet_state_dict_to_peft(own)
    own = convert_state_dict_to_peft(convert_state_dict_to_diffusers(own, original_type=_te_original_type(own)))
    if not hasattr(module, "text_model"):  # transformers 5 flattens CLIPTextModel
        own = {k.removeprefix("text_model."): v for k, v in own.items()}
    return own


def factors_from_state_dict(pipe: Any, state_dict: dict[str, torch.Tensor],
                            alphas: dict[str, float] | None) -> LoraFactors:
    """Factors of a normalized state dict whose alphas (kohya) are given per key, else alpha = rank.

    diffusers names a kohya alpha either after the module (`unet.X.conv1.alpha`) or after its
    down weight (`...to_q_lora.down.weight.alpha`); both are mapped to the peft module name.
    """
    factors: LoraFactors = {}
    for component in COMPONENTS:
        target = getattr(pipe, component, None)
        peft_keys = _component_peft_keys(component, state_dict, target) if target is not None else {}
        if not peft_keys:
            continue
        module_alpha: dict[str, float] = {}
        for key, alpha in (alphas or {}).items():
            if key.split(".")[0] != component:
                continue
            named = key.removesuffix(".alpha")
            if named in state_dict:  # the alpha names its down weight: convert that key alone
                (converted,) = _component_peft_keys(component, {named: state_dict[named]}, target)
                module_alpha[converted.rsplit(".lora_A", 1)[0]] = float(alpha)
            else:
                name = named.removeprefix(f"{component}.")
                module_alpha[name if hasattr(target, "text_model") else name.removeprefix("text_model.")] = float(alpha)
        for key, down in peft_keys.items():
            if not key.endswith(".lora_A.weight"):
                continue
            name = key.removesuffix(".lora_A.weight")
            up = peft_keys[f"{name}.lora_B.weight"]
            rank = down.shape[0]
            factors.setdefault(component, {})[name] = LoraFactor(
                down=down.float(), up=up.float(), scale=module_alpha.get(name, rank) / rank)
    return factors


def _lora_family_hint(peft_keys: dict[str, torch.Tensor]) -> str | None:
    """The family a UNet LoRA was made for, from its cross-attention key/value input width."""
    for key, value in peft_keys.items():
        if re.search(r"attn2\.to_[kv]\.lora_A\.weight$", key):
            return _CROSS_ATTENTION_FAMILY.get(int(value.shape[1]))
    return None


def check_compatible(pipe: Any, family: str, path: Path, state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """Raise LoraIncompatible naming every offending module; return module counts per component.

    Checks, in order: keys belong to a known component; the LoRA's family (text_encoder_2,
    cross-attention width) matches the base's; every module exists in the base; A and B fit
    the module's weight shape.
    """
    # 1. keys outside the components the pipeline has
    unknown = sorted({k.split(".")[0] for k in state_dict} - set(COMPONENTS))
    if unknown:
        examples = [k for k in state_dict if k.split(".")[0] in unknown][:3]
        raise UnknownLoraFormat(f"{path}: keys of no known LoRA format ({', '.join(examples)}); expected "
                                "peft/diffusers (unet.*, text_encoder.*), kohya (lora_unet_*, lora_te*_*) "
                                "or diffusers attn-processor keys")
    counts: dict[str, int] = {}
    problems: list[str] = []
    for component in COMPONENTS:
        if not any(k.split(".")[0] == component for k in state_dict):
            continue
        target = getattr(pipe, component, None)
        if target is None:
            other = "sdxl" if component == "text_encoder_2" else "another family"
            raise WrongFamily(f"{path}: has {component} layers (a {other} LoRA) but the base is {family}, "
                              f"which has no {component}; use a LoRA made for {family}")
        peft_keys = _component_peft_keys(component, state_dict, target)
        if component == "unet":
            hint = _lora_family_hint(peft_keys)
            if hint is not None and hint != family:
                example = next(k for k in peft_keys if re.search(r"attn2\.to_[kv]\.lora_A", k))
                raise WrongFamily(f"{path}: module unet.{example.rsplit('.lora_A', 1)[0]} expects "
                                  f"{peft_keys[example].shape[1]}-wide text embeddings, a {hint} LoRA; "
                                  f"the base is {family}. Use a LoRA made for {family}")
        modules = dict(target.named_modules())
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in peft_keys.items():
            match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
            if match is None:
                if key.endswith(".lora_B.bias"):
                    problems.append(f"{component}.{key}: LoRA bias terms are not supported")
                else:
                    problems.append(f"{component}.{key}: not a LoRA factor key")
                continue
            grouped.setdefault(match.group(1), {})[match.group(2)] = value
        for name, pair in sorted(grouped.items()):
            where = f"{component}.{name}"
            base_module = modules.get(name)
            shape = None if base_module is None else module_shape(base_module)
            if shape is None:
                problems.append(f"{where}: no such layer in the base's {component} (a LoRA for another "
                                f"architecture or a fine-tune with other blocks?)")
                continue
            if set(pair) != {"A", "B"}:
                problems.append(f"{where}: has lora_{'A' if 'A' in pair else 'B'} but not its partner")
                continue
            down, up = pair["A"], pair["B"]
            fits = (up.shape[0] == shape[0] and up.shape[1] == down.shape[0]
                    and tuple(down.shape[1:2]) == shape[1:2] and (len(shape) == 2 or down.shape[2:] == shape[2:]
                                                               or (down.dim() == 2 and shape[2:] == (1, 1))))
            if not fits:
                problems.append(f"{where}: LoRA A {tuple(down.shape)} / B {tuple(up.shape)} do not fit the "
                                f"base weight {shape}")
        counts[component] = len(grouped)
    if problems:
        cls = LoraShapeMismatch if all("do not fit" in p for p in problems) else UnknownLoraFormat
        listing = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise cls(f"{path}: {len(problems)} module(s) incompatible with the {family} base:\n  {listing}")
    return counts


# --- 2. loading as runtime adapters (merge variant 1) ---------------------------------


def load_adapter(pipe: Any, family: str, path: str | Path, adapter_name: str) -> dict[str, int]:
    """Check a LoRA against the base, then load it as a named diffusers adapter (weight 1).

    Returns the number of LoRA modules per component. Text-encoder layers are loaded too.
    """
    file = lora_file(path)
    state_dict, alphas, prefixed = diffusers_state_dict(pipe, file)
    counts = check_compatible(pipe, family, file, state_dict)
    te_old = _te_original_type(k for k in state_dict if not k.startswith("unet.")) is not None
    if alphas or prefixed or te_old:
        # kohya alphas, un-prefixed attn-processor keys and old-layout text-encoder keys are
        # where diffusers 0.42 loses alphas or layers: hand it the factors with alpha/r folded
        # into B, which every diffusers version reads at scale 1.
        folded = peft_state_dict(factors_from_state_dict(pipe, state_dict, alphas), text_model_prefix=False)
        pipe.load_lora_weights(folded, adapter_name=adapter_name)
    else:  # from the file, so that alphas stored in its metadata are honoured
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter_name)
    loaded = adapter_factors(pipe, adapter_name)
    for component, expected in counts.items():
        got = len(loaded.get(component, {}))
        if got != expected:
            raise LoraIncompatible(f"{file}: diffusers loaded {got} of {expected} {component} LoRA modules; "
                                   "the file has layers it did not apply")
    return counts


def set_weights(pipe: Any, weights: dict[str, float]) -> None:
    """Activate adapters with their weights (variant 1): l1 for the style, l2 for the LCM-LoRA."""
    pipe.set_adapters(list(weights), list(weights.values()))


def adapter_factors(pipe: Any, adapter_name: str) -> LoraFactors:
    """Read one adapter's factors back from the injected peft layers, at weight 1.

    scale = lora_alpha / r as peft computed it on load (set_adapters weights excluded).
    """
    from peft.tuners.lora import LoraLayer

    factors: LoraFactors = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                continue
            r = module.r[adapter_name]
            scale = module.lora_alpha[adapter_name] / r if not module.use_rslora.get(adapter_name, False) \
                else module.lora_alpha[adapter_name] / r ** 0.5
            factors.setdefault(component, {})[name] = LoraFactor(
                down=module.lora_A[adapter_name].weight.detach().clone().float(),
                up=module.lora_B[adapter_name].weight.detach().clone().float(),
                scale=float(scale),
            )
    return factors


def read_factors(pipe: Any, family: str, path: str | Path, adapter_name: str = "_probe") -> LoraFactors:
    """A LoRA file's factors as diffusers interprets it, leaving the pipeline as it was."""
    load_adapter(pipe, family, path, adapter_name)
    try:
        return adapter_factors(pipe, adapter_name)
    finally:
        pipe.delete_adapters(adapter_name)
