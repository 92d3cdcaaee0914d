"""Style-LoRA merge: theta' = theta_pre + l1 * tau_style + l2 * tau_LCM (LCM-LoRA report, eq. 4).

The LCM-LoRA report (Section 3.2) treats a LoRA as a weight-space vector tau = B A * alpha/r
and combines an acceleration vector with a style vector by a weighted sum, without training.
This module is the algebra of that sum over LoRA factors (`components/lora/factors.py`, read
from files by `components/lora/io.py`) and the writing of its variants:

1. runtime adapters: diffusers `load_lora_weights(adapter_name=...)` + `set_adapters`
   (`lora_io.load_adapter`, `lora_io.set_weights`);
2. one exact merged LoRA: ranks concatenated, scales folded in (`concat_ranks`), written in the
   diffusers/peft and kohya formats (`save_lora_folder`);
3. the sum fused into the base weights (`fuse_into`), saved as a diffusers folder
   (`save_pretrained`) and an original-layout single file (`save_single_file`);
4. an SVD-compressed merged LoRA at a target rank, with its error (`svd_compress`).

Text-encoder layers are kept and applied in every variant.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from components.lora.factors import LoraFactor, LoraFactors, module_shape
from components.lora.io import LoraIncompatible, LoraShapeMismatch, WrongFamily

# --- 1. variant 2: the exact merged LoRA ------------------------------------------------


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

# --- 2. variant 3: fused into the base --------------------------------------------------


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
            if module is None or module_shape(module) is None:
                raise LoraShapeMismatch(f"fuse_into: {component}.{name}: no such layer with a weight in the base")
            if hasattr(module, "base_layer"):
                raise LoraIncompatible(f"fuse_into: {component}.{name} still carries LoRA adapters; "
                                       "fuse into a freshly loaded base")
            delta = f.delta()
            if tuple(delta.shape) != tuple(module.weight.shape):
                raise LoraShapeMismatch(f"fuse_into: {component}.{name}: delta {tuple(delta.shape)} does not fit "
                                        f"the base weight {tuple(module.weight.shape)}")
            module.weight.add_(delta.to(module.weight.dtype))


# --- 3. variant 4: SVD compression ------------------------------------------------------


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


# --- 4. writing LoRAs and fused checkpoints -----------------------------------------------


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
    from components.lora import formats as lora_formats

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
    lora_formats.save_file(kohya_sd, paths["kohya"], metadata=meta)
    return paths


def save_single_file(pipe: Any, path: str | Path, family: str, metadata: dict[str, str] | None = None) -> Path:
    """The fused checkpoint as one safetensors file in the original (LDM/SGM) layout.

    UNet, VAE and text encoder(s) under `model.diffusion_model.`, `first_stage_model.`,
    `cond_stage_model.` / `conditioner.embedders.N.` (`components/models/ldm_layout.py`), the layout
    A1111 and ComfyUI load and diffusers reads with
    `StableDiffusionPipeline.from_single_file(path, config=<base folder>)` (or
    `load_base(path, config=<base folder>)`); the text encoders carry the style's fused
    text-encoder layers when it has them.
    """
    from safetensors.torch import save_file

    from components.models.ldm_layout import pipeline_to_ldm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(pipeline_to_ldm(pipe, family), str(path), metadata={"format": "pt", **(metadata or {})})
    return path
