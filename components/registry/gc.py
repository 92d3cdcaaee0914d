"""Garbage collection of a registry name: plan what to delete, and delete it unless dry run.

Keeps the newest `keep` versions and every version an alias points to; removes what dead
publishers left once older than the grace period (claims that never got a manifest, their
files and digest index entries, leaving a tombstone so the id is never reused) and stale
S3 multipart uploads. `Registry.gc` in `components/registry/registry.py` lists versions and aliases
and calls `run_gc`.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field

from components.registry.claims import STALE_CLAIM_S, forget_digest, read_claim
from components.registry.manifest import MANIFEST, RegistryError, timestamp, version_dir
from components.storage.storage import AlreadyExists, Storage


@dataclass(frozen=True)
class GcPlan:
    """What `gc` deletes (or would delete, in a dry run) and what it keeps."""

    name: str
    delete: list[str]
    keep: list[str]
    aliased: dict[str, list[str]]  # version -> aliases pointing at it (always kept)
    incomplete: list[str]  # claimed long ago, never got a manifest: claim and files removed
    dry_run: bool
    uploads: list[str] = field(default_factory=list)  # stale multipart uploads (S3) aborted


def run_gc(storage: Storage, name: str, keep: int, versions: list[str], aliases: dict[str, str], *,
           dry_run: bool = True, grace_s: float | None = None) -> GcPlan:
    """Plan (and unless `dry_run`, carry out) the gc of `name`, whose complete `versions` (oldest
    first) and `aliases` (alias -> version) the caller listed; grace_s defaults to STALE_CLAIM_S."""
    grace = STALE_CLAIM_S if grace_s is None else grace_s
    aliased: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        aliased.setdefault(version, []).append(alias)
    newest = set(versions[-keep:]) if keep else set()
    kept = [v for v in versions if v in newest or v in aliased]
    delete = [v for v in versions if v not in kept]
    incomplete = stale_incomplete(storage, name, set(versions), grace)
    uploads = [u for u in storage.multipart_uploads(name) if time.time() - u.initiated > grace]
    if not dry_run:
        for version in delete:
            vdir = version_dir(name, version)
            forget_digest(storage, name, version)
            storage.delete(f"{vdir}/{MANIFEST}")  # invisible first, then the files
            storage.delete(vdir, recursive=True)
        for version in incomplete:
            tombstone = {"version": int(version), "removed_at": timestamp(), "reason": "abandoned claim"}
            with contextlib.suppress(AlreadyExists):
                storage.write_bytes(f"{name}/tombstones/{version}.json", json.dumps(tombstone).encode(),
                                    create_only=True)
            forget_digest(storage, name, version)
            storage.delete(version_dir(name, version), recursive=True)
            storage.delete(f"{name}/claims/{version}.json")
        for upload in uploads:
            storage.abort_multipart_upload(upload)
    return GcPlan(name=name, delete=delete, keep=kept, aliased={v: sorted(a) for v, a in aliased.items()},
                  incomplete=incomplete, dry_run=dry_run, uploads=[f"{u.rel} ({u.upload_id})" for u in uploads])


def stale_incomplete(storage: Storage, name: str, complete: set[str], grace: float) -> list[str]:
    """Claimed versions without a manifest whose claim is older than `grace` seconds."""
    stale = []
    for entry in storage.ls(f"{name}/claims"):
        version = entry.removesuffix(".json")
        if not version.isdigit() or version in complete:
            continue
        try:
            claimed_at = float((read_claim(storage, name, version) or {})["claimed_at"])
        except (RegistryError, KeyError, TypeError, ValueError):
            continue
        if time.time() - claimed_at > grace:
            stale.append(version)
    return sorted(stale, key=int)
