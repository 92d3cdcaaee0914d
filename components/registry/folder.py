"""Check a LoRA folder before it is published, and read its metadata (no storage access).

The folder must hold `.safetensors` weights and no pickle-format weights; its model card is
validated (or generated from the base); metrics, gate, lineage and base default to the
folder's `metrics.json` and `lineage.json`; credential-like metadata keys are redacted and the
value of an AWS credential variable anywhere in the metadata is refused.
`components/registry/registry.py` publishes what passes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from components.lora.model_card import ModelCardError, check_model_card, render_model_card
from components.models.base_model import PICKLE_SUFFIXES
from components.registry.manifest import CARD, MANIFEST, Manifest, RegistryError

# Metadata keys whose values are redacted: whole `_`/`-`/`.`-separated words, so that
# `aws_secret_access_key` is caught and `tokenizer` or `max_tokens` are not.
_SECRET_KEY = re.compile(r"(?:^|[_.-])(?:secret|password|passwd|token|credentials?|private_key|api_key|access_key)"
                         r"(?:$|[_.-])", re.IGNORECASE)


def scan_folder(src: Path) -> list[str]:
    """The files to publish (relative paths, sorted); refuses pickles, a foreign manifest.json and
    folders without .safetensors weights, listing every problem at once."""
    if not src.is_dir():
        raise RegistryError(f"{src}: not a folder; publish takes a LoRA folder")
    files, pickles, problems = [], [], []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_dir():
            continue
        if not path.is_file():
            problems.append(f"{rel}: not a regular file")
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            pickles.append(rel)
        files.append(rel)
    if pickles:
        raise RegistryError(f"{src}: refusing pickle-format weights {pickles}: they can run code when loaded; "
                            "save them as .safetensors")
    if MANIFEST in files:
        # A folder pulled from a registry carries its old manifest: not content, replaced.
        try:
            Manifest.from_json((src / MANIFEST).read_bytes(), str(src / MANIFEST))
            files.remove(MANIFEST)
        except RegistryError:
            problems.append(f"{MANIFEST}: reserved for the registry manifest; rename or remove it")
    if not any(f.endswith(".safetensors") for f in files):
        problems.append("no .safetensors weights file found")
    if problems:
        raise RegistryError(f"{src}: cannot publish:\n  - " + "\n  - ".join(problems))
    return files


def folder_metadata(src: Path, metrics: dict | None, gate: dict | None, lineage: dict | None,
                    base: dict | None, force_reason: str | None = None,
                    ) -> tuple[dict | None, dict | None, dict | None, dict | None]:
    """(metrics, gate, lineage, base): the given ones, else read from the folder (the gate from
    metrics.json's `gate` entry); a failed gate is refused unless `force_reason` says why."""
    if metrics is None and (src / "metrics.json").is_file():
        metrics = _read_json_file(src / "metrics.json")
    if gate is None and isinstance(metrics, dict) and isinstance(metrics.get("gate"), dict):
        gate = metrics["gate"]
    if isinstance(metrics, dict) and "gate" in metrics:
        metrics = {k: v for k, v in metrics.items() if k != "gate"}
    if lineage is None and (src / "lineage.json").is_file():
        lineage = _read_json_file(src / "lineage.json")
    if base is None:
        base = _base_from_metadata(lineage, src / CARD)
    if gate is not None and gate.get("passed") is False and not force_reason:
        violations = gate.get("violations") or []
        raise RegistryError(f"{src}: its evaluation gate failed; a LoRA that failed its gate is not "
                            f"published without --force --reason. Violations: {violations}")
    return metrics, gate, lineage, base


def model_card(src: Path, name: str, base: dict | None) -> bytes | None:
    """Validate README.md; generate one from the metadata if the folder has none."""
    card_path = src / CARD
    if card_path.is_file():
        try:
            check_model_card(card_path.read_text(), str(card_path))
        except ModelCardError as exc:
            raise RegistryError(str(exc)) from None
        return None
    base_model = str((base or {}).get("reference") or (base or {}).get("name") or "")
    if not base_model:
        raise RegistryError(f"{src}: no README.md model card and no base to generate one from; add a "
                            "README.md with YAML front matter (base_model, library_name, tags, recommended) "
                            "or a lineage.json with a `base` entry")
    tags = ["lora", "lcm", "lcm-lora", "text-to-image", "stable-diffusion", "diffusers"]
    if (base or {}).get("family") == "sdxl":
        tags.append("stable-diffusion-xl")
    return render_model_card(base_model=base_model, title=name, tags=tags, hub_id=(base or {}).get("hub_id"),
                             license=(base or {}).get("license")).encode()


def small_texts(src: Path, files: list[str]) -> dict[str, bytes]:
    """Metadata files (json, yaml, md, txt, csv under 4 MB) that could carry credentials."""
    suffixes = (".json", ".yaml", ".yml", ".md", ".txt", ".csv", ".toml")
    return {rel: (src / rel).read_bytes() for rel in files
            if rel.endswith(suffixes) and (src / rel).stat().st_size < 4 * 1024 * 1024}


def refuse_credentials(name: str, texts: dict[str, bytes]) -> None:
    """Fail if the value of an AWS credential variable appears in the manifest or metadata."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var, "").encode()
        leaked = sorted(rel for rel, text in texts.items() if len(value) >= 8 and value in text)
        if leaked:
            raise RegistryError(f"{name}: {leaked} contain the value of ${var}; remove credentials from "
                                "metrics/lineage before publishing")


def _base_from_metadata(lineage: Any, card_path: Path) -> dict[str, Any] | None:
    """The base a LoRA was made for: lineage `base` or `inputs.base` (distill's record), with
    family and fingerprint filled from lineage `resolved.base` or the card's `lcm_lora` entry."""
    lineage = lineage if isinstance(lineage, dict) else {}
    raw = lineage.get("base")
    if raw is None and isinstance(lineage.get("inputs"), dict):
        raw = lineage["inputs"].get("base")
    base: dict[str, Any] = dict(raw) if isinstance(raw, dict) else ({"reference": raw} if isinstance(raw, str) else {})
    card: dict[str, Any] = {}
    if card_path.is_file():
        with contextlib.suppress(ModelCardError):
            card = check_model_card(card_path.read_text(), str(card_path))
    lcm = card.get("lcm_lora") if isinstance(card.get("lcm_lora"), dict) else {}
    resolved = lineage.get("resolved", {}).get("base", {}) if isinstance(lineage.get("resolved"), dict) else {}
    if "reference" not in base and (resolved.get("reference") or card.get("base_model")):
        base["reference"] = resolved.get("reference") or card["base_model"]
    for key in ("hub_id", "license"):  # the card's Hub fields (bases.NAME.hub_id / license)
        if key not in base and resolved.get(key):
            base[key] = resolved[key]
    if "family" not in base and (resolved.get("family") or lcm.get("family")):
        base["family"] = resolved.get("family") or lcm["family"]
    if "fingerprint" not in base:
        fingerprint = (base.get("fingerprints") or {}).get("unet") if isinstance(base.get("fingerprints"), dict) \
            else None
        fingerprint = fingerprint or lineage.get("base_fingerprint") or lcm.get("base_fingerprint")
        if fingerprint:
            base["fingerprint"] = fingerprint
    return base or None


def redact(value: Any) -> Any:
    """Drop credential-like keys from metadata (lineage often embeds resolved configs)."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: not valid JSON ({exc})") from None
