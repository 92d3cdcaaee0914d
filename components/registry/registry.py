"""Versioned LoRA registry (DESIGN.md contract 5) on any `Storage` root, local or S3.

Layout under the root:

    NAME/claims/VERSION.json             create-only: who took this version id, when, and the
                                         digest of the manifest it will write
    NAME/digests/HEX.json                create-only: which version holds content HEX
    NAME/versions/VERSION/<files>        the LoRA folder, immutable
    NAME/versions/VERSION/manifest.json  written last, create-only: a version without it
                                         does not exist for readers
    NAME/aliases/ALIAS.json              {version, updated_at, history}, moved by CAS
    NAME/events/ALIAS/SEQ.json           create-only, one per alias move (registry_events.py)
    NAME/tombstones/VERSION.json         an abandoned claim removed by gc (keeps ids unique)

Version ids are increasing integers. A publisher claims the next id with a create-only
write of its claim; a racing publisher that loses the claim takes the next id, so both
succeed with different ids and never write into each other's folder. Claims are never
deleted, so ids are never reused, not even after `gc`.

Every read of a manifest recomputes its digest and compares it with the claim's, so an
edited manifest is refused. Publishing content whose digest already has a version returns
that version. References: `NAME@ALIAS`, `NAME:VERSION`, `NAME@sha256:HEX`, `NAME` (the
`latest` alias, which every publish moves forward).

This module is the facade: publish, list, resolve and verify versions, and the public alias,
pull and gc methods. The work lives beside it: names, references and the manifest format in
`registry_manifest.py`; folder checks before publish in `registry_folder.py`; version claims
and the digest index in `registry_claims.py`; alias moves, gates and rollback in
`registry_aliases.py` (events in `registry_events.py`); verified pulls and the cache in
`registry_pull.py`; gc in `registry_gc.py`. Loading a pulled LoRA into a pipeline is
`components/serve/pipeline_loader.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.registry.aliases import (
    AliasMove,
    NothingToRollBack,
    check_gate,
    move_alias,
    read_alias,
    rollback_target,
)
from components.registry.claims import (
    CLAIM_ATTEMPTS,
    claim_digest,
    claim_version,
    existing_version,
    read_claim,
    wait_for_version,
)
from components.registry.folder import (
    folder_metadata,
    model_card,
    redact,
    refuse_credentials,
    scan_folder,
    small_texts,
)
from components.registry.gc import GcPlan, run_gc
from components.registry.manifest import (
    CARD,
    DIGEST_PREFIX,
    LATEST,
    MANIFEST,
    NAME_PATTERN,
    FileEntry,
    Manifest,
    Reference,
    RegistryError,
    hash_file,
    parse_reference,
    validate_name,
    validate_version,
    version_dir,
)
from components.registry.pull import ProgressCallback, PullResult, each, pull_version
from components.storage.storage import PART_SIZE, NotFound, Storage, StorageError


@contextlib.contextmanager
def _naming_target(storage: Storage, rel: str, what: str) -> Iterator[None]:
    """An OSError while writing `rel` (a full disk, no permission) re-raised naming where it was written."""
    try:
        yield
    except StorageError:
        raise  # already names its key (AlreadyExists, NotFound, ...)
    except OSError as err:
        raise OSError(err.errno, f"{storage.url(rel)}: {err.strerror or err} while publishing {what}; free "
                      "space or fix permissions there and publish again (`lcmlora registry gc` removes the "
                      "abandoned claim)") from err


@dataclass(frozen=True)
class PublishResult:
    manifest: Manifest
    existing: bool  # True: identical content was already this version; nothing uploaded
    alias: AliasMove | None = None  # the move of the requested alias, if any


@dataclass(frozen=True)
class VersionStatus:
    """One version of `list`: its verified manifest, or why it cannot be read."""

    version: str
    manifest: Manifest | None
    error: str | None = None


# --- the registry --------------------------------------------------------------------------


class Registry:
    """Publish, list, show, pull and alias versioned LoRA folders under one storage root."""

    def __init__(self, storage: Storage, cache_dir: str | os.PathLike = "~/.cache/lcmlora/registry"):
        self.storage = storage
        self.cache_dir = Path(os.path.expanduser(str(cache_dir))).absolute()

    @classmethod
    def from_params(cls, params: Any) -> Registry:
        """From `params.registry` (root, cache_dir); the S3 endpoint comes from `params.storage`."""
        st = params.storage
        storage = Storage(params.registry.root, endpoint_url=st.endpoint_url, region=st.region, retries=st.retries)
        return cls(storage, params.registry.cache_dir)

    def __repr__(self) -> str:
        return f"Registry({self.storage.url()!r})"

    # --- publish -----------------------------------------------------------------------

    def publish(self, folder: str | os.PathLike, name: str, *, alias: str | None = None,
                base: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                gate: dict[str, Any] | None = None, lineage: dict[str, Any] | None = None,
                progress: ProgressCallback | None = None, force_reason: str | None = None) -> PublishResult:
        """Publish `folder` as the next version of `name`; move `latest` (and `alias`) to it.

        Metadata defaults come from the folder: `metrics.json` (its `gate` entry is the gate)
        and `lineage.json` (its `base` entry is the base). A failed gate is refused, and a
        version whose gate did not pass (failed or missing) gets no `alias`, unless
        `force_reason` says why (recorded in the alias history). Content identical to an
        existing version of `name` (same digest) returns that version: nothing is uploaded.
        """
        validate_name(name)
        if alias is not None:
            validate_name(alias, "alias")
        src = Path(folder)
        # 1. Check the folder: files, weights format, model card, metadata.
        files = scan_folder(src)
        metrics, gate, lineage, base = folder_metadata(src, metrics, gate, lineage, base, force_reason)
        card = model_card(src, name, base)
        metadata = json.dumps([base, metrics, gate, lineage], default=str).encode()
        refuse_credentials(name, {MANIFEST: metadata, **small_texts(src, files)})
        # 2. Hash every file before anything is uploaded; the digest covers them and the metadata.
        entries = {rel: hash_file(src / rel, PART_SIZE) for rel in files}
        if card is not None:
            entries[CARD] = FileEntry(hashlib.sha256(card).hexdigest(), len(card))
        draft = Manifest(name=name, version="0", files=entries, base=redact(base), metrics=redact(metrics),
                         gate=gate, lineage=redact(lineage))
        if alias is not None and alias != LATEST:
            check_gate(draft, f"{src} as {name}@{alias}", force_reason)
        # 3. Identical content already published (or being published): that version.
        for _ in range(CLAIM_ATTEMPTS):
            existing = existing_version(self.storage, name, draft.digest)
            if existing is None:
                # 4. Claim the next version id (create-only, with the digest), then the digest itself.
                version, created_at = claim_version(self.storage, name, draft.digest)
                existing = claim_digest(self.storage, name, draft.digest, version)
                if existing is None:
                    break
            if wait_for_version(self.storage, name, existing, draft.digest):
                found = self._manifest(name, existing)
                self._move_alias(name, LATEST, found.version, forward_only=True, kind="publish")
                move = self._publish_alias(name, alias, found.version, force_reason)
                return PublishResult(found, existing=True, alias=move)
            # Its publisher died before finishing: the index entry is gone, claim the content again.
        else:
            raise RegistryError(f"{name}: could not publish {draft.digest} after {CLAIM_ATTEMPTS} attempts")
        manifest = dataclasses.replace(draft, version=version, created_at=created_at)
        vdir = version_dir(name, version)
        # 5. Upload the files; nobody else writes under a claimed id.
        what = f"{name} version {version}"

        def upload(rel: str) -> None:
            with _naming_target(self.storage, f"{vdir}/{rel}", what):
                self.storage.put_file(src / rel, f"{vdir}/{rel}")
            if progress is not None:
                progress(rel, entries[rel].size)

        if card is not None:
            with _naming_target(self.storage, f"{vdir}/{CARD}", what):
                self.storage.write_bytes(f"{vdir}/{CARD}", card)
        each(upload, files)
        # 6. The manifest last, create-only: from here on the version exists.
        with _naming_target(self.storage, f"{vdir}/{MANIFEST}", what):
            self.storage.write_bytes(f"{vdir}/{MANIFEST}", manifest.to_json().encode(), create_only=True)
        # 7. Move aliases: `latest` only ever forward, the requested alias unconditionally.
        self._move_alias(name, LATEST, version, forward_only=True, kind="publish")
        move = self._publish_alias(name, alias, version, force_reason)
        return PublishResult(manifest, existing=False, alias=move)

    def _publish_alias(self, name: str, alias: str | None, version: str, force_reason: str | None) -> AliasMove | None:
        if alias is None or alias == LATEST:
            return None
        return self._move_alias(name, alias, version, kind="force" if force_reason else "publish",
                                reason=force_reason)

    # --- list / show ---------------------------------------------------------------------

    def list(self, name: str | None = None) -> list[str]:
        """Registered names (no argument), or the complete versions of `name`, oldest first
        (numerically: 2 before 10). Manifests are not read; `versions` verifies them."""
        if name is None:
            return [n for n in self.storage.ls() if NAME_PATTERN.fullmatch(n) and self.list(n)]
        validate_name(name)
        suffix = f"/{MANIFEST}"
        versions = [p.removesuffix(suffix) for p in self.storage.ls(f"{name}/versions", recursive=True)
                    if p.endswith(suffix) and p.count("/") == 1]
        return sorted((v for v in versions if v.isdigit()), key=int)

    def versions(self, name: str) -> list[VersionStatus]:
        """Every complete version of `name` with its verified manifest, or the reason it cannot
        be read (a malformed or edited manifest): one broken version hides none of the others."""
        out = []
        for version in self.list(name):
            try:
                out.append(VersionStatus(version, self._manifest(name, version)))
            except RegistryError as exc:
                out.append(VersionStatus(version, None, str(exc)))
        return out

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version for every alias of `name`."""
        validate_name(name)
        out = {}
        for entry in self.storage.ls(f"{name}/aliases"):
            alias = entry.removesuffix(".json")
            if entry.endswith(".json") and NAME_PATTERN.fullmatch(alias):
                with contextlib.suppress(NotFound):
                    out[alias] = read_alias(self.storage, name, alias)[0]["version"]
        return out

    def resolve(self, ref: str | Reference) -> tuple[str, str]:
        """(name, version) a reference points to now."""
        ref = parse_reference(ref) if isinstance(ref, str) else ref
        if ref.version is not None:
            return ref.name, ref.version
        if ref.digest is not None:
            return ref.name, self._resolve_digest(ref)
        try:
            return ref.name, read_alias(self.storage, ref.name, ref.alias or LATEST)[0]["version"]
        except NotFound:
            if ref.alias == LATEST:
                versions = self.list(ref.name)
                if versions:
                    return ref.name, versions[-1]
                raise RegistryError(f"{ref.name}: no versions in {self.storage.url()}") from None
            raise RegistryError(f"{ref}: no alias {ref.alias!r} for {ref.name} in {self.storage.url()} "
                                f"(aliases: {sorted(self.aliases(ref.name)) or 'none'})") from None

    def _resolve_digest(self, ref: Reference) -> str:
        """The version whose digest starts with `ref.digest` (unique), checked against its manifest."""
        assert ref.digest is not None
        hits = sorted(e.removesuffix(".json") for e in self.storage.ls(f"{ref.name}/digests")
                      if e.endswith(".json") and e.startswith(ref.digest))
        if not hits:
            raise RegistryError(f"{ref}: no version of {ref.name} has this digest in {self.storage.url()}")
        if len(hits) > 1:
            raise RegistryError(f"{ref}: ambiguous digest prefix, matches {', '.join(h[:16] for h in hits)}...; "
                                "give more hex digits")
        version = existing_version(self.storage, ref.name, DIGEST_PREFIX + hits[0])
        if version is None or version not in self.list(ref.name):
            raise RegistryError(f"{ref}: the version with this digest is not complete (being published or removed)")
        if self._manifest(ref.name, version).digest != DIGEST_PREFIX + hits[0]:
            raise RegistryError(f"{ref}: the digest index points at {ref.name}:{version}, whose digest differs")
        return version

    def show(self, ref: str | Reference) -> Manifest:
        """The manifest of the version `ref` points to (verified against its claim)."""
        name, version = self.resolve(ref)
        return self._manifest(name, version)

    def _manifest(self, name: str, version: str) -> Manifest:
        """Read and verify a manifest: its digest must be the one recorded create-only in the claim
        when the version was taken, so any edit (gate, metrics, a file's sha256) is refused."""
        path = f"{version_dir(name, version)}/{MANIFEST}"
        try:
            raw = self.storage.read_bytes(path)
        except NotFound:
            raise RegistryError(f"{name}:{version}: no such version in {self.storage.url()} "
                                f"(versions: {', '.join(self.list(name)) or 'none'})") from None
        manifest = Manifest.from_json(raw, self.storage.url(path))
        if (manifest.name, manifest.version) != (name, version):
            raise RegistryError(f"{self.storage.url(path)}: manifest says {manifest.name}:{manifest.version}, "
                                f"expected {name}:{version}")
        claim = read_claim(self.storage, name, version) or {}
        recorded, created_at = claim.get("digest"), claim.get("created_at")
        if not recorded:
            raise RegistryError(f"{self.storage.url(path)}: no digest recorded in claims/{version}.json; the "
                                "version cannot be verified, refusing it")
        if manifest.digest != recorded or manifest.stored_digest != recorded or manifest.created_at != created_at:
            raise RegistryError(f"{self.storage.url(path)}: edited after publish: its content digest is "
                                f"{manifest.digest}, the claim recorded {recorded}; refusing it (republish "
                                "the folder to make a new version)")
        return manifest

    # --- pull ----------------------------------------------------------------------------

    def pull(self, ref: str | Reference, to: str | os.PathLike, *, overwrite: bool = False,
             progress: ProgressCallback | None = None) -> PullResult:
        """Download, verify and write the version `ref` points to as folder `to`, atomically.

        Every file is checked against the manifest's sha256 and size while it downloads;
        verified files go to a content-addressed cache, so pulling the same bytes again
        downloads nothing. Any mismatch fails naming the file, and nothing is written.
        """
        name, version = self.resolve(ref)
        manifest = self._manifest(name, version)
        return pull_version(self.storage, self.cache_dir, manifest, version_dir(name, version), to,
                            overwrite=overwrite, progress=progress)

    # --- aliases ---------------------------------------------------------------------------

    def alias_set(self, name: str, alias: str, version: str, *, force_reason: str | None = None) -> AliasMove:
        """Point `alias` at an existing `version` (compare-and-swap; appended to its history).

        Refused when the version's gate did not pass (failed: the rules are named; missing:
        never evaluated) unless `force_reason` says why; the reason goes into the history.
        """
        validate_name(name)
        validate_name(alias, "alias")
        validate_version(version)
        manifest = self._manifest(name, version)  # the version must exist and verify
        if alias != LATEST:
            check_gate(manifest, f"{name}:{version} as {name}@{alias}", force_reason)
        move = self._move_alias(name, alias, version, kind="force" if force_reason else "set", reason=force_reason)
        assert move is not None
        return move

    def alias_rollback(self, name: str, alias: str, *, reason: str | None = None) -> AliasMove:
        """Move `alias` back to the version it pointed to before its current one (by CAS).

        Rollbacks undo moves: two rollbacks after 1 -> 2 -> 3 end on 1, not back on 3.
        """
        validate_name(name)
        validate_name(alias, "alias")
        try:
            move = self._move_alias(name, alias, rollback_target, kind="rollback", reason=reason)
        except NotFound:
            raise RegistryError(f"{name}@{alias}: no such alias (aliases: {sorted(self.aliases(name)) or 'none'})") \
                from None
        except NothingToRollBack:
            raise RegistryError(f"{name}@{alias}: nothing to roll back to: no earlier version in its history") \
                from None
        assert move is not None
        return move

    def alias_history(self, name: str, alias: str) -> list[AliasMove]:
        """Every move of `alias`, oldest first."""
        validate_name(name)
        validate_name(alias, "alias")
        try:
            state, _ = read_alias(self.storage, name, alias)
        except NotFound:
            raise RegistryError(f"{name}@{alias}: no such alias (aliases: {sorted(self.aliases(name)) or 'none'})") \
                from None
        return [AliasMove.from_dict(h) for h in state.get("history", [])]

    def _move_alias(self, name: str, alias: str, version: str | Callable[[list[AliasMove]], str], *,
                    forward_only: bool = False, kind: str = "set", reason: str | None = None) -> AliasMove | None:
        """Compare-and-swap `alias` to `version` (or to `version(history)`), then log the event."""
        return move_alias(self.storage, name, alias, version, lambda v: self._manifest(name, v).digest,
                          forward_only=forward_only, kind=kind, reason=reason)

    # --- gc --------------------------------------------------------------------------------

    def gc(self, name: str, keep: int, *, dry_run: bool = True, grace_s: float | None = None) -> GcPlan:
        """Delete all but the newest `keep` versions, never one an alias points to.

        Dry run by default. Also removes what dead publishers left once older than `grace_s`
        (default STALE_CLAIM_S): claims that never got a manifest, their files and digest
        index entries (a tombstone keeps the id from being reused), and incomplete S3
        multipart uploads under NAME/.
        """
        validate_name(name)
        if keep < 0:
            raise RegistryError(f"gc {name}: --keep must be >= 0, got {keep}")
        return run_gc(self.storage, name, keep, self.list(name), self.aliases(name), dry_run=dry_run,
                      grace_s=grace_s)
