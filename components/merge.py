"""Style-LoRA merge: theta' = theta_pre + l1 * tau_style + l2 * tau_LCM (LCM-LoRA report, eq. 4).

The LCM-LoRA report (Section 3.2) treats a LoRA as a weight-space vector tau = B A * alpha/r
and combines an acceleration vector with a style vector by a weighted sum, without training.
This module reads style LoRAs as people publish them and builds the variants of that sum:

1. runtime adapters: diffusers `load_lora_weights(adapter_name=...)` + `set_adapters` (`load_adapter`,
   `set_weights`);
2. one exact merged LoRA: ranks concatenated, scales folded in (`concat_ranks`), written in the
   diffusers/peft and kohya formats (`save_lora_folder`);
3. the sum fused into the base weights (`fuse_into`), saved as a diffusers folder
   (`save_pretrained`) and an original-layout single file (`save_single_file`);
4. an SVD-compressed merged LoRA at a target rank, with its error (`svd_compress`).

Every LoRA is read the way diffusers reads it: it is loaded as a peft adapter and its factors
are read back from the injected layers (`adapter_factors`), so variants 2-4 are built from
exactly what variant 1 runs. Before anything is loaded the file is checked against the base
(`check_compatible`): another family's LoRA, a shape mismatch or an unknown key format raise
a `LoraIncompatible` error naming the module, instead of diffusers' silent skip or a deep
`size mismatch`. Text-encoder layers are kept and applied in every variant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.base_model import refuse_pickle

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # pipeline attributes a LoRA may touch
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # contract 4's diffusers/peft file
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


@dataclass(frozen=True)
class LoraFactor:
    """One LoRA module: delta W = scale * B @ A (report eq. 1 with scale = alpha / r).

    down: A, r x in (Linear) or r x in x kh x kw (Conv2d); up: B, out x r (x 1 x 1).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """scale * B @ A, shaped like the base weight (out x in or out x in x kh x kw)."""
        product = self.up.flatten(1).double() @ self.down.flatten(1).double()
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (self.scale * product).reshape(shape)


LoraFactors = dict[str, dict[str, LoraFactor]]  # component ("unet", "text_encoder", ...) -> module -> factor


# --- 0. locating and reading files ------------------------------------------------------


def lora_file(path: str | Path) -> Path:
    """The safetensors file of a LoRA given as a file or a contract-4 folder; pickles refused."""
    path = Path(path)
    refuse_pickle(path)
    if path.is_dir():
        candidate = path / LORA_WEIGHT_NAME
        if not candidate.exists():
            raise FileNotFoundError(f"{path}: LoRA folder without {LORA_WEIGHT_NAME}")
        return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise UnknownLoraFormat(f"{path}: LoRAs are read from .safetensors files only (got {path.suffix or 'no suffix'})")
    return path


def _raw_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (safe_open)


def _needs_unet_prefix(keys: Iterable[str]) -> bool:
    """True for the old diffusers attn-processor format: UNet keys without the `unet.` prefix."""
    keys = list(keys)
    return bool(keys) and all(k.startswith(_UNET_ROOTS) for k in keys)


def diffusers_state_dict(pipe: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, bool]:
    """The file normalized by diffusers' own `lora_state_dict` (kohya, SGM blocks, attn-processor).

    Returns (state dict with `unet.` / `text_encoder.` / `text_encoder_2.` keys, network alphas
    or None, whether the raw file needed the `unet.` prefix added).
    """
    raw, _ = _raw_state_dict(path)
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


# --- 1. compatibility checks ------------------------------------------------------------


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


def _module_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else None


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
            shape = None if base_module is None else _module_shape(base_module)
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


# --- 2. variant 1: runtime adapters -----------------------------------------------------


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


# --- 3. variant 2: the exact merged LoRA ------------------------------------------------


def concat_ranks(terms: Sequence[tuple[float, LoraFactors]]) -> LoraFactors:
    """sum_i w_i tau_i as one LoRA of rank sum r_i (report eq. 4, exact).

    A' = [A_1; A_2; ...] stacked along the rank; B' = [w_1 s_1 B_1, w_2 s_2 B_2, ...] concatenated
    along the rank, so B' A' = sum_i w_i s_i B_i A_i; the merged scale is 1 (alpha = rank).
    A module present in only some terms keeps only their factors.
    """
    merged: LoraFactors = {}
    keys = sorted({(c, m) for _, factors in terms for c, mods in factors.items() for m in mods})
    for component, module in keys:
        parts = [(w, f[component][module]) for w, f in terms if module in f.get(component, {})]
        kernels = {tuple(p.down.shape[1:]) for _, p in parts}
        if len(kernels) > 1:
            raise LoraShapeMismatch(f"{component}.{module}: LoRA A factors of shapes {sorted(kernels)} cannot be "
                                    "stacked (different conv kernels); merge them with `fuse_into` instead")
        down = torch.cat([p.down for _, p in parts], dim=0)
        up = torch.cat([(w * p.scale) * p.up for w, p in parts], dim=1)
        merged.setdefault(component, {})[module] = LoraFactor(down=down, up=up, scale=1.0)
    return merged


def scaled(factors: LoraFactors, weight: float) -> LoraFactors:
    """w * tau: the same LoRA with every module's scale multiplied by w."""
    return {c: {m: LoraFactor(f.down, f.up, f.scale * weight) for m, f in mods.items()} for c, mods in factors.items()}


def peft_state_dict(factors: LoraFactors, *, text_model_prefix: bool = True) -> dict[str, torch.Tensor]:
    """diffusers/peft keys (`unet.<module>.lora_A.weight`) with each scale folded into B.

    Folding makes alpha = rank for every module, which is what diffusers assumes for a file
    without alphas, so the file loads at the right strength with any loader.
    `text_model_prefix` writes CLIP keys as `text_model.encoder...` (older transformers layout,
    which diffusers strips when the text encoder is flattened).
    """
    out: dict[str, torch.Tensor] = {}
    for component, modules in factors.items():
        for name, f in modules.items():
            if component != "unet" and text_model_prefix and not name.startswith("text_model."):
                name = f"text_model.{name}"
            out[f"{component}.{name}.lora_A.weight"] = f.down.contiguous()
            out[f"{component}.{name}.lora_B.weight"] = (f.scale * f.up).contiguous()
    return out


# --- 4. variant 3: fused into the base --------------------------------------------------


@torch.no_grad()
def fuse_into(pipe: Any, factors: LoraFactors) -> None:
    """theta' = theta_pre + sum of deltas, written into the pipeline's weights in place (eq. 4).

    The pipeline must carry no adapters: the deltas land on the plain weights.
    """
    for component, modules in factors.items():
        model = getattr(pipe, component, None)
        if model is None:
            raise WrongFamily(f"fuse_into: the LoRA has {component} layers but the pipeline has no {component}")
        named = dict(model.named_modules())
        for name, f in modules.items():
            module = named.get(name)
            if module is None or _module_shape(module) is None:
                raise LoraShapeMismatch(f"fuse_into: {component}.{name}: no such layer with a weight in the base")
            if hasattr(module, "base_layer"):
                raise LoraIncompatible(f"fuse_into: {component}.{name} still carries LoRA adapters; "
                                       "fuse into a freshly loaded base")
            delta = f.delta()
            if tuple(delta.shape) != tuple(module.weight.shape):
                raise LoraShapeMismatch(f"fuse_into: {component}.{name}: delta {tuple(delta.shape)} does not fit "
                                        f"the base weight {tuple(module.weight.shape)}")
            module.weight.add_(delta.to(module.weight.dtype))


# --- 5. variant 4: SVD compression ------------------------------------------------------


def svd_compress_factor(f: LoraFactor, rank: int) -> tuple[LoraFactor, float]:
    """The best rank-k approximation of scale * B A (Eckart-Young) and its relative Frobenius error.

    Uses QR of B and A^T so the SVD is of an r x r core, never of the out x in delta.
    """
    up = f.up.flatten(1).double() * f.scale  # out x r
    down = f.down.flatten(1).double()  # r x in
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    k = min(rank, s.numel())
    total = float(s.square().sum())
    error = float(s[k:].square().sum() / total) ** 0.5 if total > 0 else 0.0
    root = s[:k].sqrt()
    new_up = (q_up @ u[:, :k]) * root  # out x k
    new_down = root[:, None] * (vh[:k] @ q_down.T)  # k x in
    return LoraFactor(down=new_down.float().reshape(k, *f.down.shape[1:]),
                      up=new_up.float().reshape(f.up.shape[0], k, *f.up.shape[2:]), scale=1.0), error


def svd_compress(factors: LoraFactors, rank: int) -> tuple[LoraFactors, dict[str, float]]:
    """Every module compressed to at most `rank`; returns the LoRA and per-module relative errors."""
    if rank < 1:
        raise ValueError(f"svd_compress: target rank must be >= 1, got {rank}")
    out: LoraFactors = {}
    errors: dict[str, float] = {}
    for component, modules in factors.items():
        for name, f in modules.items():
            out.setdefault(component, {})[name], errors[f"{component}.{name}"] = svd_compress_factor(f, rank)
    return out, errors


def overall_relative_error(full: LoraFactors, approx: LoraFactors) -> float:
    """||sum of deltas - approximation|| / ||sum of deltas||, Frobenius over every module."""
    num = den = 0.0
    for component, modules in full.items():
        for name, f in modules.items():
            d = f.delta()
            num += float((d - approx[component][name].delta()).square().sum())
            den += float(d.square().sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def factor_summary(factors: LoraFactors) -> dict[str, Any]:
    """Module count, rank range and parameter count per component, for reports."""
    summary: dict[str, Any] = {}
    for component, modules in factors.items():
        ranks = [f.rank for f in modules.values()]
        summary[component] = {
            "modules": len(modules),
            "rank_min": min(ranks),
            "rank_max": max(ranks),
            "parameters": sum(f.down.numel() + f.up.numel() for f in modules.values()),
        }
    return summary


# --- 6. writing LoRAs and fused checkpoints -----------------------------------------------


def factor_tensors(factors: LoraFactors) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """Per-component peft state dicts (A, B as they are) and alphas {component.module: scale * rank}."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for component, modules in factors.items():
        for name, f in modules.items():
            parts.setdefault(component, {})[f"{name}.lora_A.weight"] = f.down.contiguous()
            parts[component][f"{name}.lora_B.weight"] = f.up.contiguous()
            alphas[f"{component}.{name}"] = f.scale * f.rank
    return parts, alphas


def save_lora_folder(folder: str | Path, factors: LoraFactors, *, family: str, base_meta: dict[str, Any],
                     title: str, description: str) -> dict[str, Path]:
    """A LoRA in both formats of contract 4: diffusers/peft (+ LoraConfig metadata) and kohya.

    Per-module alpha = scale * rank, so a merged LoRA (scale 1) has alpha = rank and an input
    LoRA keeps its own alpha. Kohya text-encoder names are the standard ones
    (`lora_te_text_model_encoder_...` for SD-1.5, `lora_te1_` / `lora_te2_` for SDXL).
    """
    from safetensors.torch import save_file

    from components import lora_formats

    folder = Path(folder)
    parts, alphas = factor_tensors(factors)
    unet = parts.pop("unet", {})
    if not unet:
        raise LoraIncompatible(f"{folder}: refusing to save a LoRA without UNet layers")
    ranks = [int(t.shape[0]) for k, t in unet.items() if k.endswith("lora_A.weight")]
    paths = lora_formats.save_lora(folder, unet, rank=max(set(ranks), key=ranks.count), alpha=alphas,
                                   base_meta=base_meta, text_encoder_state_dicts=parts or None, title=title,
                                   kohya_name=None)
    # kohya: from peft keys with the CLIP `text_model.` level that kohya names carry
    flat = {f"unet.{k}": v for k, v in unet.items()}
    kohya_alphas = dict(alphas)
    for component, sd in parts.items():
        for key, value in sd.items():
            module = key.rsplit(".lora_", 1)[0]
            full = module if module.startswith("text_model.") else f"text_model.{module}"
            flat[f"{component}.{full}.lora_{key.rsplit('.lora_', 1)[1]}"] = value
            kohya_alphas[f"{component}.{full}"] = alphas[f"{component}.{module}"]
    kohya_sd, network_meta = lora_formats.to_kohya(flat, kohya_alphas)
    if family == "sd15":  # SD-1.x kohya files name their one text encoder lora_te_
        kohya_sd = {re.sub(r"^lora_te1_", "lora_te_", k): v for k, v in kohya_sd.items()}
    meta = lora_formats.kohya_metadata(base_meta, title, network_meta, {
        "ss_training_comment": description, "modelspec.description": description})
    paths["kohya"] = folder / lora_formats.KOHYA_WEIGHT_NAME
    save_file(kohya_sd, str(paths["kohya"]), metadata=meta)
    return paths


def save_single_file(pipe: Any, path: str | Path, family: str, metadata: dict[str, str] | None = None) -> Path:
    """The fused checkpoint as one safetensors file in the original (LDM/SGM) layout.

    UNet, VAE and text encoder(s) under `model.diffusion_model.`, `first_stage_model.`,
    `cond_stage_model.` / `conditioner.embedders.N.` (`components/ldm_layout.py`), the layout
    A1111 and ComfyUI load and diffusers reads with
    `StableDiffusionPipeline.from_single_file(path, config=<base folder>)` (or
    `load_base(path, config=<base folder>)`); the text encoders carry the style's fused
    text-encoder layers when it has them.
    """
    from safetensors.torch import save_file

    from components.ldm_layout import pipeline_to_ldm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(pipeline_to_ldm(pipe, family), str(path), metadata={"format": "pt", **(metadata or {})})
    return path
