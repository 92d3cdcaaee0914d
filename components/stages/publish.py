"""The publish stage: a gated LoRA folder -> a new immutable registry version, alias moved (contract 5).

    output = run_publish(params.publish, registry=Registry.from_params(params), folder=Path("lora"),
                         name=registry_name(params.publish, "toy"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import PublishConfig, RegistryConfig
from components.registry.registry import Registry


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

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able summary (what tasks return and the run summary shows)."""
        return {"name": self.name, "version": self.version, "alias": self.alias, "registry": self.registry,
                "reference": self.reference, "pull": self.pull, "digest": self.digest, "existing": self.existing}


def registry_name(cfg: PublishConfig, base_name: str) -> str:
    """`publish.name`, or `<base>-lcm-lora`."""
    return cfg.name or f"{base_name}-lcm-lora"


def pull_command(name: str, alias: str, registry_root: str) -> str:
    """`lcmlora registry pull NAME@ALIAS --to DIR`, naming the registry root when it is not the default."""
    extra = f" --set registry.root={registry_root}" if registry_root != RegistryConfig().root else ""
    return f"lcmlora registry pull {name}@{alias} --to DIR{extra}"


def run_publish(cfg: PublishConfig, *, registry: Registry, folder: Path, name: str, registry_root: str,
                gate: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> PublishOutput:
    """Publish `folder` as the next version of `name` and move `publish.alias` to it.

    `gate` and `metrics` default to the folder's metrics.json; the registry refuses a failed gate.
    `registry_root` is `registry.root` as written in params (for the pull command).
    """
    published = registry.publish(folder, name, alias=cfg.alias, gate=gate, metrics=metrics)
    manifest = published.manifest
    return PublishOutput(name=name, version=str(manifest.version), alias=cfg.alias, registry=registry.storage.url(),
                         reference=f"{name}:{manifest.version}", pull=pull_command(name, cfg.alias, registry_root),
                         digest=manifest.digest, existing=published.existing)
