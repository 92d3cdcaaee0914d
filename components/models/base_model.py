"""Base models (DESIGN contract 1): load, detect the family, fingerprint, refuse pickles.

A base reference is a diffusers folder, a hub id, or a single-file `.safetensors`
checkpoint. Pickle checkpoints are refused before anything opens them: unpickling runs
arbitrary code. Fingerprints hash a module's config and its weights, so two bases that share
a VAE share its fingerprint (and its latent shards).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr

from components.config import BaseConfig, ConfigError, Params

Family = Literal["sd15", "sdxl"]

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".joblib")  # never loaded, never published
DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024}
# Config keys that name where a model came from rather than what it is.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "_diffusers_version", "transformers_version", "_commit_hash",
    "_use_default_values", "_class_name", "architectures", "torch_dtype", "dtype",
}
# Keys that only an SDXL-family single-file checkpoint has (second text encoder).
_SDXL_SINGLE_FILE_KEYS = ("conditioner.embedders.1.", "add_embedding.linear_1.weight")


# diffusers' from_pretrained/from_single_file builds modules inside accelerate's init_empty_weights,
# which swaps torch.nn.Module.register_parameter process-wide and restores what it saw on entry: two
# loads in two threads interleave the swap and leave every later module in the process on the meta
# device. Loads made through this module are serialised by this lock (an RLock: load_vae of a single
# file goes through load_base).
LOAD_LOCK = threading.RLock()


class PickleRefused(ValueError):
    """A pickle checkpoint was offered; lcmlora never unpickles weights."""


@dataclass(frozen=True)
class LoadedBase:
    pipe: Any  # StableDiffusionPipeline or StableDiffusionXLPipeline
    family: Family
    fingerprints: dict[str, str]  # unet, vae, text_encoder[, text_encoder_2]

    @property
    def fingerprint(self) -> str:
        """The base's own fingerprint: its UNet's."""
        return self.fingerprints["unet"]


def refuse_pickle(path: str | Path) -> None:
    """Raise PickleRefused if `path` names a pickle checkpoint (never opens it)."""
    suffix = Path(str(path)).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise PickleRefused(
            f"{path}: {suffix} files are pickles and can run arbitrary code when loaded; "
            "lcmlora only loads .safetensors. Convert it first, e.g. load it yourself in a "
            "sandbox and save with safetensors.torch.save_file."
        )


def _clean_config(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {k: v for k, v in dict(config).items() if k not in _VOLATILE_CONFIG_KEYS}


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 (16 hex chars) over a module's config and every tensor's name, dtype, shape, bytes."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        digest.update(json.dumps(_clean_config(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def _is_hub_id(reference: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", reference)) and not Path(reference).exists()


def _looks_like_path(reference: str) -> bool:
    """Absolute, `./`, `../`, `~`, a `.safetensors` name, or inside a folder that exists."""
    if reference.startswith(("/", "./", "../", "~", ".\\", "..\\")) or reference.endswith(".safetensors"):
        return True
    parent = Path(reference).parent
    return parent != Path(".") and parent.is_dir()


def check_reference(reference: str | Path) -> None:
    """Raise FileNotFoundError naming `reference` when it is neither an existing path nor a hub id.

    Called before diffusers or huggingface_hub see it: they would report a missing folder as
    an invalid repo id (HFValidationError).
    """
    reference = str(reference)
    if Path(reference).exists():
        return
    if _looks_like_path(reference) or not _is_hub_id(reference):
        raise FileNotFoundError(f"base reference {reference}: no such file or folder (and not a Hub repo id); "
                                "fix bases.NAME.reference in params.yaml (or --base), e.g. data/toy/base")


def _model_index(reference: str) -> dict[str, Any]:
    path = Path(reference)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise FileNotFoundError(f"{reference}: not a diffusers folder (no model_index.json)")
        return json.loads(index.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(reference, "model_index.json")).read_text())


def _single_file_family(path: Path) -> Family:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith(_SDXL_SINGLE_FILE_KEYS) or k in _SDXL_SINGLE_FILE_KEYS for k in keys):
        return "sdxl"
    if any(k.startswith(("cond_stage_model.", "model.diffusion_model.", "text_encoder.", "unet.")) for k in keys):
        return "sd15"
    raise ValueError(f"{path}: cannot tell the family from its keys; set bases.NAME.family in params")


def detect_family(reference: str | Path) -> Family:
    """`sdxl` if the base has a second text encoder / text_time conditioning, else `sd15`."""
    reference = str(reference)
    refuse_pickle(reference)
    check_reference(reference)
    if reference.endswith(".safetensors"):
        return _single_file_family(Path(reference))
    index = _model_index(reference)
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in index:
        return "sdxl"
    return "sd15"


def _pipeline_class(family: Family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _refuse_pickle_only_folder(reference: str) -> None:
    """A diffusers folder whose weights exist only as .bin would make diffusers unpickle them."""
    folder = Path(reference)
    if not folder.is_dir():
        return
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        part = folder / sub
        if part.is_dir() and not any(part.glob("*.safetensors")) and any(
            p.suffix in PICKLE_SUFFIXES for p in part.iterdir()
        ):
            raise PickleRefused(
                f"{part}: weights are only in pickle format ({', '.join(p.name for p in part.iterdir())}); "
                "lcmlora only loads .safetensors"
            )


def fingerprints_of(pipe: Any) -> dict[str, str]:
    """Fingerprints of the UNet, VAE and text encoder(s) of a loaded pipeline."""
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts["text_encoder_2"] = pipe.text_encoder_2
    return {name: module_fingerprint(module) for name, module in parts.items()}


def load_base(
    reference: str | Path,
    family: Family | None = None,
    dtype: torch.dtype = torch.float32,
    config: str | Path | None = None,
) -> LoadedBase:
    """Load a base pipeline from a diffusers folder, hub id or single `.safetensors` file.

    `config` is a diffusers folder holding the configs a single-file checkpoint needs
    offline (e.g. `data/arch/sd15`).
    """
    reference = str(reference)
    refuse_pickle(reference)
    detected = detect_family(reference)  # refuses a reference that is neither a path nor a hub id
    if family is not None and family != detected:
        raise ConfigError(f"{reference}: params say family {family!r} but the weights are {detected!r}")
    cls = _pipeline_class(detected)
    extra: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False} if detected == "sd15" else {}
    with LOAD_LOCK:
        if reference.endswith(".safetensors"):
            kwargs = {"config": str(config)} if config is not None else {}
            pipe = cls.from_single_file(reference, dtype=dtype, **kwargs, **extra)
        else:
            _refuse_pickle_only_folder(reference)
            pipe = cls.from_pretrained(reference, dtype=dtype, use_safetensors=True, **extra)
    return LoadedBase(pipe=pipe, family=detected, fingerprints=fingerprints_of(pipe))


def load_vae(reference: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, str]:
    """The base's VAE alone (no UNet in memory for a folder or hub id) and its fingerprint."""
    reference = str(reference)
    refuse_pickle(reference)
    check_reference(reference)
    if reference.endswith(".safetensors"):
        vae = load_base(reference, dtype=dtype).pipe.vae
    else:
        from diffusers import AutoencoderKL

        _refuse_pickle_only_folder(reference)
        with LOAD_LOCK:
            vae = AutoencoderKL.from_pretrained(reference, subfolder="vae", dtype=dtype, use_safetensors=True)
    return vae, module_fingerprint(vae)


def resolve_base(params: Params, name_or_ref: str) -> tuple[str, BaseConfig]:
    """A base by its name in params.yaml, or an ad-hoc reference (path or hub id)."""
    if name_or_ref in params.bases:
        return name_or_ref, params.bases[name_or_ref]
    refuse_pickle(name_or_ref)
    if not Path(name_or_ref).exists() and not _is_hub_id(name_or_ref):
        known = ", ".join(sorted(params.bases)) or "none"
        raise ConfigError(f"--base {name_or_ref}: not a base in params (known: {known}), a path, or a hub id")
    family = detect_family(name_or_ref)
    stem = Path(name_or_ref.rstrip("/")).name.removesuffix(".safetensors")
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "base"
    return name, BaseConfig(reference=name_or_ref, family=family, resolution=DEFAULT_RESOLUTION[family])


class ResolvedBase(BaseModel):
    """A base of a run, resolved once: its name, its settings and its modules' fingerprints (contract 1).

    What every stage runner takes. It is plain data (a Prefect parameter, a deployment's JSON);
    `load()` hands out the pipeline that fingerprinting loaded, once, so a command that
    fingerprints a base to find its inputs and then uses it loads it one time. A base resolved
    for encoding alone (`vae_only`) has only its VAE's fingerprint.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    config: BaseConfig
    fingerprints: dict[str, str]  # unet, vae, text_encoder[, text_encoder_2]; vae alone when vae_only
    _kept: dict[str, Any] = PrivateAttr(default_factory=dict)  # what fingerprinting loaded; never serialized

    @property
    def fingerprint(self) -> str:
        """The base's own fingerprint: its UNet's."""
        return self.fingerprints["unet"]

    def load(self) -> LoadedBase:
        """The base's pipeline (float32): the one fingerprinting kept, handed out once, else loaded now."""
        if "pipeline" in self._kept:
            return self._kept.pop("pipeline")
        return load_base(self._reference(), family=self.config.family)

    def load_vae(self) -> Any:
        """The base's VAE (float32): the one fingerprinting kept, handed out once, else the VAE alone."""
        if "vae" in self._kept:
            return self._kept.pop("vae")
        if "pipeline" in self._kept:
            return self._kept.pop("pipeline").pipe.vae
        return load_vae(self._reference())[0]

    def with_config(self, config: BaseConfig) -> ResolvedBase:
        """The same modules under other settings (a fine-tune inheriting its parent's resolution)."""
        return ResolvedBase(name=self.name, config=config, fingerprints=self.fingerprints)

    def _reference(self) -> str:
        from components.paths import project_path

        return str(project_path(self.config.reference))


def fingerprint_base(name: str, config: BaseConfig, *, keep_loaded: bool = False,
                     vae_only: bool = False) -> ResolvedBase:
    """Load the base once to fingerprint it (`vae_only`: its VAE alone); `keep_loaded` keeps what was
    loaded for the stage that uses it."""
    from components.paths import project_path

    reference = str(project_path(config.reference))
    if vae_only:
        vae, vae_fp = load_vae(reference)
        resolved, kept = ResolvedBase(name=name, config=config, fingerprints={"vae": vae_fp}), {"vae": vae}
    else:
        loaded = load_base(reference, family=config.family)
        resolved = ResolvedBase(name=name, config=config, fingerprints=dict(loaded.fingerprints))
        kept = {"pipeline": loaded}
    if keep_loaded:
        resolved._kept.update(kept)
    return resolved


def resolved_base(params: Params, name_or_ref: str, *, keep_loaded: bool = True,
                  vae_only: bool = False) -> ResolvedBase:
    """`resolve_base` and its fingerprints: a base of params by name, or an ad-hoc reference."""
    name, config = resolve_base(params, name_or_ref)
    return fingerprint_base(name, config, keep_loaded=keep_loaded, vae_only=vae_only)
