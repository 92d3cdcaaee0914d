"""The publish stage: a gated LoRA folder -> a new immutable registry version, alias moved (contract 5).

    output = publish_stage(params, storage, folder_rel="stages/evaluate/toy/KEY", subdir="lora",
                           name=registry_name(params.publish, "toy"))   # a folder the pipeline stored
    output = run_publish(params.publish, registry=Registry.from_params(params), folder=Path("lora"),
                         name="toy-lcm-lora", registry_root=params.registry.root)   # any local folder
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import Params, PublishConfig, RegistryConfig
from components.registry.manifest import Manifest
from components.registry.pull import ProgressCallback
from components.registry.registry import Registry
from components.storage.folder_sync import pull_folder
from components.storage.storage import Storage


@dataclass(frozen=True)
class PublishOutput:
    """The published version and how to pull it."""

    name: str
    version: str
    alias: str
    registry: str  # the registry root's URL
    reference: str  # NAME:VERSION
    pull: str  # the command that pulls it by alias
    digest: str  # the version's content digest: NAME@sha256:DIGEST pins it
    existing: bool  # identical content was already published: that version was returned
    manifest: Manifest  # the version's manifest (files, sizes, gate)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able summary (what tasks return and the run summary shows)."""
        return {"name": self.name, "version": self.version, "alias": self.alias, "registry": self.registry,
                "reference": self.reference, "pull": self.pull, "digest": self.digest, "existing": self.existing}


def registry_name(cfg: PublishConfig, base_name: str, objective: str = "lcm") -> str:
    """`publish.name`, or `<base>-lcm-lora`; a PCM-LoRA: `<base>-pcm-lora` (`publish.name` + `-pcm`)."""
    if cfg.name:
        return cfg.name if objective == "lcm" else f"{cfg.name}-{objective}"
    return f"{base_name}-{objective}-lora"


def pull_command(name: str, alias: str, registry_root: str) -> str:
    """`lcmlora registry pull NAME@ALIAS --to DIR`, naming the registry root when it is not the default."""
    extra = f" --set registry.root={registry_root}" if registry_root != RegistryConfig().root else ""
    return f"lcmlora registry pull {name}@{alias} --to DIR{extra}"


def run_publish(cfg: PublishConfig, *, registry: Registry, folder: Path, name: str, registry_root: str,
                gate: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                move_alias: bool = True, force_reason: str | None = None,
                progress: ProgressCallback | None = None) -> PublishOutput:
    """Publish `folder` as the next version of `name` and move `publish.alias` to it (`move_alias`).

    `gate` and `metrics` default to the folder's metrics.json; the registry refuses a failed gate,
    and moves no alias to a version whose gate did not pass unless `force_reason` says why.
    `registry_root` is `registry.root` as written in params (for the pull command).
    """
    alias = cfg.alias if move_alias else None
    published = registry.publish(folder, name, alias=alias, gate=gate, metrics=metrics, progress=progress,
                                 force_reason=force_reason)
    manifest = published.manifest
    pulled_as = alias or "latest"
    return PublishOutput(name=name, version=str(manifest.version), alias=pulled_as, registry=registry.storage.url(),
                         reference=f"{name}:{manifest.version}", pull=pull_command(name, pulled_as, registry_root),
                         digest=manifest.digest, existing=published.existing, manifest=manifest)


def publish_stage(params: Params, storage: Storage, *, folder_rel: str, name: str, subdir: str = "",
                  gate: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> PublishOutput:
    """The publish stage's one call: a folder the pipeline stored (`folder_rel/subdir`) -> the next version."""
    return run_publish(params.publish, registry=Registry.from_params(params),
                       folder=pull_folder(storage, folder_rel) / subdir, name=name,
                       registry_root=params.registry.root, gate=gate, metrics=metrics)
