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
`latest` alias, which every publish moves forward). Names, references and the manifest format live in
`components/registry_manifest.py`; loading a pulled LoRA into a pipeline in
`components/pipeline_loader.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.base_model import PICKLE_SUFFIXES
from components.content_hash import file_sha256
from components.model_card import ModelCardError, check_model_card, render_model_card
from components.registry_events import AliasEvent, emit_prefect, write_event
from components.registry_manifest import (
    DIGEST_PREFIX,
    LATEST,
    NAME_PATTERN,
    FileEntry,
    Manifest,
    Reference,
    RegistryError,
    hash_file,
    parse_reference,
    validate_name,
    validate_version,
)
from components.storage import PART_SIZE, AlreadyExists, NotFound, PreconditionFailed, Storage

MANIFEST = "manifest.json"
CARD = "README.md"
CAS_ATTEMPTS = 200  # alias moves retried this often under contention before giving up
CLAIM_ATTEMPTS = 1000  # version ids tried by one publisher before giving up
STALE_CLAIM_S = 3600.0  # gc removes incomplete versions whose claim is older than this
PUBLISH_WAIT_S = 300.0  # an identical publish waits this long for a racing publisher's version
POLL_S = 0.1  # how often it looks
WORKERS = 4  # parallel file transfers per publish / pull
FICLONE = 0x40049409  # Linux ioctl: reflink one file's extents into another (btrfs, xfs, ...)
# Metadata keys whose values are redacted: whole `_`/`-`/`.`-separated words, so that
# `aws_secret_access_key` is caught and `tokenizer` or `max_tokens` are not.
_SECRET_KEY = re.compile(r"(?:^|[_.-])(?:secret|password|passwd|token|credentials?|private_key|api_key|access_key)"
                         r"(?:$|[_.-])", re.IGNORECASE)


class VerificationError(RegistryError):
    """A pulled file does not match its manifest entry (tampered or truncated)."""


class GateRefused(RegistryError):
    """An alias move (or a publish with an alias) refused: the version's gate did not pass."""


@dataclass(frozen=True)
class AliasMove:
    version: str
    previous: str | None
    updated_at: str
    kind: str = "set"  # publish | set | force | rollback
    reason: str | None = None  # why a gate was overridden, or why it was rolled back
    digest: str | None = None  # sha256:<hex> of `version`

    def to_dict(self) -> dict[str, Any]:
        return {"version": int(self.version), "previous": None if self.previous is None else int(self.previous),
                "updated_at": self.updated_at, "kind": self.kind, "reason": self.reason, "digest": self.digest}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AliasMove:
        previous = raw.get("previous")
        return cls(str(raw["version"]), None if previous is None else str(previous), raw["updated_at"],
                   raw.get("kind", "set"), raw.get("reason"), raw.get("digest"))


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


@dataclass(frozen=True)
class PullResult:
    manifest: Manifest
    path: Path
    downloaded: list[str] = field(default_factory=list)  # files fetched from the registry
    cached: list[str] = field(default_factory=list)  # files served from the local cache


ProgressCallback = Callable[[str, int], None]  # (relative path, bytes) after each file


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _file_matches(path: Path, entry: FileEntry) -> bool:
    """Re-verify a local file: its parts in parallel threads if listed, else one sha256 pass."""
    if not entry.parts:
        return file_sha256(path) == entry.sha256
    part_size = entry.part_size or PART_SIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        def part_ok(index: int) -> bool:
            data = os.pread(fd, part_size, index * part_size)
            return hashlib.sha256(data).hexdigest() == entry.parts[index]

        with ThreadPoolExecutor(WORKERS) as pool:
            return all(pool.map(part_ok, range(len(entry.parts))))
    finally:
        os.close(fd)


def _claim_dead(claim: dict[str, Any] | None) -> bool:
    """A claim whose publisher cannot finish: missing, older than STALE_CLAIM_S, or made by a
    process of this host that no longer runs."""
    if claim is None or time.time() - float(claim.get("claimed_at", 0)) > STALE_CLAIM_S:
        return True
    if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int):
        try:
            os.kill(claim["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _copy_or_reflink(src: Path, dest: Path) -> None:
    """Copy a cache blob into a pulled folder: a reflink (shared extents, copy-on-write) where
    the filesystem has them, else a full copy. Never a hard link: editing a pulled file must
    not change the cache or other pulled folders."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return
        except OSError:
            pass
    shutil.copyfile(src, dest)  # copy_file_range/sendfile where the kernel has them


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
    if "family" not in base and (resolved.get("family") or lcm.get("family")):
        base["family"] = resolved.get("family") or lcm["family"]
    if "fingerprint" not in base:
        fingerprint = (base.get("fingerprints") or {}).get("unet") if isinstance(base.get("fingerprints"), dict) \
            else None
        fingerprint = fingerprint or lineage.get("base_fingerprint") or lcm.get("base_fingerprint")
        if fingerprint:
            base["fingerprint"] = fingerprint
    return base or None


def _redact(value: Any) -> Any:
    """Drop credential-like keys from metadata (lineage often embeds resolved configs)."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) else _redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: not valid JSON ({exc})") from None


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

    # --- paths -------------------------------------------------------------------------

    @staticmethod
    def _version_dir(name: str, version: str) -> str:
        return f"{name}/versions/{version}"

    @staticmethod
    def _alias_path(name: str, alias: str) -> str:
        return f"{name}/aliases/{alias}.json"

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
        files = self._scan_folder(src)
        metrics, gate, lineage, base = self._folder_metadata(src, metrics, gate, lineage, base, force_reason)
        card = self._model_card(src, name, base)
        metadata = json.dumps([base, metrics, gate, lineage], default=str).encode()
        self._refuse_credentials(name, {MANIFEST: metadata, **self._small_texts(src, files)})
        # 2. Hash every file before anything is uploaded; the digest covers them and the metadata.
        entries = {rel: hash_file(src / rel, PART_SIZE) for rel in files}
        if card is not None:
            entries[CARD] = FileEntry(hashlib.sha256(card).hexdigest(), len(card))
        draft = Manifest(name=name, version="0", files=entries, base=_redact(base), metrics=_redact(metrics),
                         gate=gate, lineage=_redact(lineage))
        if alias is not None and alias != LATEST:
            self._check_gate(draft, f"{src} as {name}@{alias}", force_reason)
        # 3. Identical content already published (or being published): that version.
        for _ in range(CLAIM_ATTEMPTS):
            existing = self._existing_version(name, draft.digest)
            if existing is None:
                # 4. Claim the next version id (create-only, with the digest), then the digest itself.
                version, created_at = self._claim_version(name, draft.digest)
                existing = self._claim_digest(name, draft.digest, version)
                if existing is None:
                    break
            found = self._wait_for_version(name, existing, draft.digest)
            if found is not None:
                self._move_alias(name, LATEST, found.version, forward_only=True, kind="publish")
                move = self._publish_alias(name, alias, found.version, force_reason)
                return PublishResult(found, existing=True, alias=move)
            # Its publisher died before finishing: the index entry is gone, claim the content again.
        else:
            raise RegistryError(f"{name}: could not publish {draft.digest} after {CLAIM_ATTEMPTS} attempts")
        manifest = dataclasses.replace(draft, version=version, created_at=created_at)
        vdir = self._version_dir(name, version)
        # 5. Upload the files; nobody else writes under a claimed id.
        def upload(rel: str) -> None:
            self.storage.put_file(src / rel, f"{vdir}/{rel}")
            if progress is not None:
                progress(rel, entries[rel].size)

        if card is not None:
            self.storage.write_bytes(f"{vdir}/{CARD}", card)
        self._each(upload, files)
        # 6. The manifest last, create-only: from here on the version exists.
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

    @staticmethod
    def _check_gate(manifest: Manifest, what: str, force_reason: str | None) -> None:
        """Refuse an alias for a version whose gate did not pass, naming the failed rules."""
        status = manifest.gate_status
        if status == "passed" or force_reason:
            return
        if status == "missing":
            raise GateRefused(f"{what}: refused: the version was never evaluated (gate missing); evaluate it, "
                              "or override with --force --reason \"...\" (recorded in the alias history)")
        rules = (manifest.gate or {}).get("violations") or ["(no violations recorded)"]
        raise GateRefused(f"{what}: refused: its gate failed: {'; '.join(map(str, rules))}; override with "
                          "--force --reason \"...\" (recorded in the alias history)")

    def _scan_folder(self, src: Path) -> list[str]:
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

    @staticmethod
    def _folder_metadata(src: Path, metrics: dict | None, gate: dict | None, lineage: dict | None,
                         base: dict | None, force_reason: str | None = None,
                         ) -> tuple[dict | None, dict | None, dict | None, dict | None]:
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

    @staticmethod
    def _model_card(src: Path, name: str, base: dict | None) -> bytes | None:
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
        return render_model_card(base_model=base_model, title=name, tags=tags).encode()

    @staticmethod
    def _small_texts(src: Path, files: list[str]) -> dict[str, bytes]:
        """Metadata files (json, yaml, md, txt, csv under 4 MB) that could carry credentials."""
        suffixes = (".json", ".yaml", ".yml", ".md", ".txt", ".csv", ".toml")
        return {rel: (src / rel).read_bytes() for rel in files
                if rel.endswith(suffixes) and (src / rel).stat().st_size < 4 * 1024 * 1024}

    @staticmethod
    def _refuse_credentials(name: str, texts: dict[str, bytes]) -> None:
        """Fail if the value of an AWS credential variable appears in the manifest or metadata."""
        for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
            value = os.environ.get(var, "").encode()
            leaked = sorted(rel for rel, text in texts.items() if len(value) >= 8 and value in text)
            if leaked:
                raise RegistryError(f"{name}: {leaked} contain the value of ${var}; remove credentials from "
                                    "metrics/lineage before publishing")

    def _claim_version(self, name: str, digest: str) -> tuple[str, str]:
        """Take the next free version id with a create-only claim recording the manifest digest."""
        version = self._highest_claimed(name) + 1
        created_at = _now()
        claim = {"claimed_at": time.time(), "created_at": created_at, "digest": digest,
                 "host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(CLAIM_ATTEMPTS):
            try:
                self.storage.write_bytes(f"{name}/claims/{version}.json",
                                         json.dumps({"version": version, **claim}).encode(), create_only=True)
                return str(version), created_at
            except AlreadyExists:
                version += 1
        raise RegistryError(f"{name}: could not claim a version id after {CLAIM_ATTEMPTS} attempts")

    def _highest_claimed(self, name: str) -> int:
        ids = [n.removesuffix(".json") for n in self.storage.ls(f"{name}/claims")]
        ids += [n.removesuffix(".json") for n in self.storage.ls(f"{name}/tombstones")]
        ids += self.storage.ls(f"{name}/versions")
        return max((int(i) for i in ids if i.isdigit()), default=0)

    @staticmethod
    def _digest_path(name: str, digest: str) -> str:
        return f"{name}/digests/{digest.removeprefix(DIGEST_PREFIX)}.json"

    def _claim_digest(self, name: str, digest: str, version: str) -> str | None:
        """Record `version` as the holder of `digest` (create-only). If a racing publisher of the
        same content won, give our claim back (nothing was uploaded) and return its version."""
        try:
            self.storage.write_bytes(self._digest_path(name, digest),
                                     json.dumps({"version": int(version), "digest": digest}).encode(),
                                     create_only=True)
            return None
        except AlreadyExists:
            self.storage.delete(f"{name}/claims/{version}.json")
            holder = self._existing_version(name, digest)
            if holder is None:
                raise RegistryError(f"{name}: the digest index for {digest} changed during publish; retry") from None
            return holder

    def _existing_version(self, name: str, digest: str) -> str | None:
        """The version holding `digest`, complete or still being published; None if none (or stale)."""
        try:
            version = str(json.loads(self.storage.read_bytes(self._digest_path(name, digest)))["version"])
        except NotFound:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"{self.storage.url(self._digest_path(name, digest))}: malformed ({exc})") from None
        if self.storage.exists(f"{self._version_dir(name, version)}/{MANIFEST}"):
            return version
        if _claim_dead(self._read_claim(name, version)):
            # Left by a dead publisher or a gc that stopped half-way: not a version, forget it.
            self.storage.delete(self._digest_path(name, digest))
            return None
        return version

    def _wait_for_version(self, name: str, version: str, digest: str) -> Manifest | None:
        """The manifest of `version` once its (racing) publisher wrote it; None if it died."""
        deadline = time.monotonic() + PUBLISH_WAIT_S
        path = f"{self._version_dir(name, version)}/{MANIFEST}"
        while not self.storage.exists(path):
            if self._existing_version(name, digest) is None:
                return None
            if time.monotonic() > deadline:
                raise RegistryError(f"{name}: identical content ({digest}) is being published as {name}:{version} "
                                    f"by another publisher that has not finished after {PUBLISH_WAIT_S:.0f} s; "
                                    "retry later (`registry gc` removes a dead publisher's claim)")
            time.sleep(POLL_S)
        return self._manifest(name, version)

    def _read_claim(self, name: str, version: str) -> dict[str, Any] | None:
        try:
            claim = json.loads(self.storage.read_bytes(f"{name}/claims/{version}.json"))
        except NotFound:
            return None
        except ValueError as exc:
            raise RegistryError(f"{self.storage.url(f'{name}/claims/{version}.json')}: malformed claim ({exc})") \
                from None
        return claim if isinstance(claim, dict) else None

    @staticmethod
    def _each(fn: Callable[[str], None], items: list[str]) -> None:
        """fn(item) for every item, WORKERS at a time; re-raises the first failure."""
        if len(items) < 2:
            for item in items:
                fn(item)
            return
        with ThreadPoolExecutor(WORKERS) as pool:
            futures = [pool.submit(fn, item) for item in items]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]  # type: ignore[misc]

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
                    out[alias] = self._read_alias(name, alias)[0]["version"]
        return out

    def resolve(self, ref: str | Reference) -> tuple[str, str]:
        """(name, version) a reference points to now."""
        ref = parse_reference(ref) if isinstance(ref, str) else ref
        if ref.version is not None:
            return ref.name, ref.version
        if ref.digest is not None:
            return ref.name, self._resolve_digest(ref)
        try:
            return ref.name, self._read_alias(ref.name, ref.alias or LATEST)[0]["version"]
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
        version = self._existing_version(ref.name, DIGEST_PREFIX + hits[0])
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
        path = f"{self._version_dir(name, version)}/{MANIFEST}"
        try:
            raw = self.storage.read_bytes(path)
        except NotFound:
            raise RegistryError(f"{name}:{version}: no such version in {self.storage.url()} "
                                f"(versions: {', '.join(self.list(name)) or 'none'})") from None
        manifest = Manifest.from_json(raw, self.storage.url(path))
        if (manifest.name, manifest.version) != (name, version):
            raise RegistryError(f"{self.storage.url(path)}: manifest says {manifest.name}:{manifest.version}, "
                                f"expected {name}:{version}")
        claim = self._read_claim(name, version) or {}
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
        target = Path(to).absolute()
        if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
            raise RegistryError(f"{target}: exists and is not empty; choose a new folder or pass overwrite")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        staging = self.cache_dir / f".staging-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            # 1. Serve what the cache has (re-hashed: the cache is only a hint), fetch the rest.
            cached = [rel for rel, e in manifest.files.items() if self._cache_valid(e)]
            missing = [rel for rel in manifest.files if rel not in cached]
            vdir = self._version_dir(name, version)

            def fetch(rel: str) -> None:
                self._fetch_verified(f"{vdir}/{rel}", manifest.files[rel], staging / manifest.files[rel].sha256, rel)
                if progress is not None:
                    progress(rel, manifest.files[rel].size)

            self._each(fetch, missing)
            # 2. All verified: move into the cache, then assemble the folder beside the target.
            for rel in missing:
                entry = manifest.files[rel]
                blob = self._blob(entry.sha256)
                blob.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(staging / entry.sha256, 0o444)  # cache entries are never edited in place
                os.replace(staging / entry.sha256, blob)
            self._assemble(manifest, target, overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return PullResult(manifest=manifest, path=target, downloaded=sorted(missing), cached=sorted(cached))

    def _blob(self, sha256: str) -> Path:
        return self.cache_dir / "sha256" / sha256[:2] / sha256

    def _cache_valid(self, entry: FileEntry) -> bool:
        blob = self._blob(entry.sha256)
        try:
            if blob.stat().st_size != entry.size:
                return False
        except FileNotFoundError:
            return False
        if _file_matches(blob, entry):
            return True
        blob.unlink(missing_ok=True)  # corrupted in place (e.g. a hardlinked copy was edited)
        return False

    def _fetch_verified(self, key: str, entry: FileEntry, dest: Path, rel: str) -> None:
        def mismatch(detail: str) -> VerificationError:
            return VerificationError(
                f"{rel}: does not match the manifest ({self.storage.url(key)}: {detail}); the stored "
                "version is tampered or truncated, nothing was written")

        def check_part(start: int, sha256: str) -> None:
            index = start // (entry.part_size or 1)
            if index >= len(entry.parts) or sha256 != entry.parts[index]:
                raise mismatch(f"part {index} at byte {start} has the wrong sha256 or lies past the "
                               f"{entry.size} bytes listed")

        # Large files: every part checked by its download thread; small ones: one digest.
        digest = None if entry.parts else hashlib.sha256()
        try:
            self.storage.get_file(key, dest, digest=digest, part_sha256=check_part if entry.parts else None,
                                  part_size=entry.part_size)
        except NotFound:
            raise VerificationError(f"{rel}: listed in the manifest but missing from {self.storage.url(key)}") from None
        except VerificationError:
            dest.unlink(missing_ok=True)
            raise
        size = dest.stat().st_size
        if size != entry.size or (digest is not None and digest.hexdigest() != entry.sha256):
            dest.unlink(missing_ok=True)
            found = f"sha256 {digest.hexdigest()[:16]}..., " if digest is not None else ""
            raise mismatch(f"{size} bytes, {found}expected {entry.size} bytes, sha256 {entry.sha256[:16]}...")

    def _assemble(self, manifest: Manifest, target: Path, overwrite: bool) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            tmp.mkdir()
            for rel, entry in manifest.files.items():
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                _copy_or_reflink(self._blob(entry.sha256), dest)
            (tmp / MANIFEST).write_bytes(manifest.raw or manifest.to_json().encode())
            if target.exists():
                if target.is_dir() and not any(target.iterdir()):
                    target.rmdir()
                elif overwrite:
                    trash = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.old.tmp"
                    os.replace(target, trash)
                    os.replace(tmp, target)
                    shutil.rmtree(trash, ignore_errors=True)
                    return
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

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
            self._check_gate(manifest, f"{name}:{version} as {name}@{alias}", force_reason)
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
            move = self._move_alias(name, alias, _rollback_target, kind="rollback", reason=reason)
        except NotFound:
            raise RegistryError(f"{name}@{alias}: no such alias (aliases: {sorted(self.aliases(name)) or 'none'})") \
                from None
        except _NothingToRollBack:
            raise RegistryError(f"{name}@{alias}: nothing to roll back to: no earlier version in its history") \
                from None
        assert move is not None
        return move

    def alias_history(self, name: str, alias: str) -> list[AliasMove]:
        """Every move of `alias`, oldest first."""
        validate_name(name)
        validate_name(alias, "alias")
        try:
            state, _ = self._read_alias(name, alias)
        except NotFound:
            raise RegistryError(f"{name}@{alias}: no such alias (aliases: {sorted(self.aliases(name)) or 'none'})") \
                from None
        return [AliasMove.from_dict(h) for h in state.get("history", [])]

    def _read_alias(self, name: str, alias: str) -> tuple[dict[str, Any], str]:
        path = self._alias_path(name, alias)
        data, tag = self.storage.read_with_etag(path)
        try:
            state = json.loads(data)
            state["version"] = str(state["version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"{self.storage.url(path)}: malformed alias file ({exc})") from None
        return state, tag

    def _move_alias(self, name: str, alias: str, version: str | Callable[[list[AliasMove]], str], *,
                    forward_only: bool = False, kind: str = "set", reason: str | None = None) -> AliasMove | None:
        """Compare-and-swap `alias` to `version` (or to `version(history)`), then log the event."""
        path = self._alias_path(name, alias)
        for attempt in range(CAS_ATTEMPTS):
            try:
                state, tag = self._read_alias(name, alias)
            except NotFound:
                state, tag = {"name": name, "alias": alias, "version": None, "history": []}, None
            previous = state.get("version")
            history = [AliasMove.from_dict(h) for h in state.get("history", [])]
            target = version(history) if callable(version) else version
            if forward_only and previous is not None and int(previous) >= int(target):
                return None
            digest = self._manifest(name, target).digest
            move = AliasMove(version=target, previous=previous, updated_at=_now(), kind=kind, reason=reason,
                             digest=digest)
            history.append(move)
            new = {"name": name, "alias": alias, "version": int(target), "updated_at": move.updated_at,
                   "history": [h.to_dict() for h in history]}
            try:
                self.storage.write_if_match(path, json.dumps(new, indent=1).encode(), tag)
            except PreconditionFailed:
                time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 20)))  # back off, then re-read
                continue
            self._log_moves(name, alias, history)
            return move
        raise RegistryError(f"{name}@{alias}: could not move the alias after {CAS_ATTEMPTS} attempts "
                            "(too many concurrent writers)")

    def _log_moves(self, name: str, alias: str, history: list[AliasMove]) -> None:
        """Append the last move to the event log (and the one before, if its writer died before
        logging it); send the Prefect event for the last move."""
        events = [AliasEvent(name=name, alias=alias, sequence=i + 1, to_version=int(m.version),
                             from_version=None if m.previous is None else int(m.previous),
                             digest=m.digest or "", kind=m.kind, reason=m.reason, moved_at=m.updated_at)
                  for i, m in enumerate(history)][-2:]
        for event in events:
            write_event(self.storage, event)
        emit_prefect(events[-1])

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
        grace = STALE_CLAIM_S if grace_s is None else grace_s
        versions = self.list(name)
        aliased: dict[str, list[str]] = {}
        for alias, version in self.aliases(name).items():
            aliased.setdefault(version, []).append(alias)
        newest = set(versions[-keep:]) if keep else set()
        kept = [v for v in versions if v in newest or v in aliased]
        delete = [v for v in versions if v not in kept]
        incomplete = self._stale_incomplete(name, set(versions), grace)
        uploads = [u for u in self.storage.multipart_uploads(name) if time.time() - u.initiated > grace]
        if not dry_run:
            for version in delete:
                vdir = self._version_dir(name, version)
                self._forget_digest(name, version)
                self.storage.delete(f"{vdir}/{MANIFEST}")  # invisible first, then the files
                self.storage.delete(vdir, recursive=True)
            for version in incomplete:
                tombstone = {"version": int(version), "removed_at": _now(), "reason": "abandoned claim"}
                with contextlib.suppress(AlreadyExists):
                    self.storage.write_bytes(f"{name}/tombstones/{version}.json", json.dumps(tombstone).encode(),
                                             create_only=True)
                self._forget_digest(name, version)
                self.storage.delete(self._version_dir(name, version), recursive=True)
                self.storage.delete(f"{name}/claims/{version}.json")
            for upload in uploads:
                self.storage.abort_multipart_upload(upload)
        return GcPlan(name=name, delete=delete, keep=kept, aliased={v: sorted(a) for v, a in aliased.items()},
                      incomplete=incomplete, dry_run=dry_run, uploads=[f"{u.rel} ({u.upload_id})" for u in uploads])

    def _forget_digest(self, name: str, version: str) -> None:
        """Remove the digest index entry of `version` (so that its content can be published again)."""
        digest = (self._read_claim(name, version) or {}).get("digest")
        if not digest:
            return
        with contextlib.suppress(NotFound, ValueError, KeyError, TypeError):
            if str(json.loads(self.storage.read_bytes(self._digest_path(name, digest)))["version"]) == version:
                self.storage.delete(self._digest_path(name, digest))

    def _stale_incomplete(self, name: str, complete: set[str], grace: float) -> list[str]:
        stale = []
        for entry in self.storage.ls(f"{name}/claims"):
            version = entry.removesuffix(".json")
            if not version.isdigit() or version in complete:
                continue
            try:
                claimed_at = float((self._read_claim(name, version) or {})["claimed_at"])
            except (RegistryError, KeyError, TypeError, ValueError):
                continue
            if time.time() - claimed_at > grace:
                stale.append(version)
        return sorted(stale, key=int)


class _NothingToRollBack(Exception):
    pass


def _rollback_target(history: list[AliasMove]) -> str:
    """The version before the current one, undoing earlier rollbacks (a stack of moves)."""
    stack: list[str] = []
    for move in history:
        if move.kind == "rollback" and stack:
            stack.pop()
        else:
            stack.append(move.version)
    if len(stack) < 2:
        raise _NothingToRollBack

    return stack[-2]
