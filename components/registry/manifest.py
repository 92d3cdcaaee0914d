"""Registry names, references and manifests (DESIGN.md contract 5): the data the registry stores.

A reference is `NAME@ALIAS`, `NAME:VERSION`, `NAME@sha256:HEX` (a version by content digest,
a unique prefix of at least 12 hex digits) or `NAME` (the `latest` alias); names, aliases and
versions match `[a-z0-9][a-z0-9._-]*`, versions are positive integers (JSON integers in the
stored files, strings in Python). A manifest lists every file of a version with its sha256
and size (and per-part sha256s for large files, so pulls verify parts in parallel), plus the
base, metrics, gate and lineage it was published with.

The version digest (`content_digest`) is the sha256 of the manifest's canonical content JSON:
`{format, files, base, metrics, gate, lineage}` dumped with sorted keys and `(",", ":")`
separators. It covers every file's sha256 and every metadata field, so it is both the
version's content address (identical content, identical digest) and the manifest's own
checksum (recorded create-only in the claim, compared on every read).
`components/registry/registry.py` reads and writes these under a storage root; the file names of a
version folder (`MANIFEST`, `CARD`) and its path (`version_dir`) are defined here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.storage.storage import PART_SIZE, check_rel

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
MAX_NAME_LENGTH = 128
LATEST = "latest"
MANIFEST_FORMAT = 2  # 2: integer versions, `digest` field, digest recorded in the claim
DIGEST_PREFIX = "sha256:"
MIN_DIGEST_PREFIX = 12  # hex digits a digest reference needs at least
DIGEST_FIELDS = ("format", "files", "base", "metrics", "gate", "lineage")  # what the digest covers
_HEX = re.compile(r"[0-9a-f]+")
MANIFEST = "manifest.json"  # in every version folder, written last
CARD = "README.md"  # the model card of a version folder


class RegistryError(RuntimeError):
    """A registry operation failed; the message names the reference or file."""



# --- names and references --------------------------------------------------------------


def validate_name(value: str, what: str = "name") -> str:
    """Return `value` if it is a valid name/alias/version, else raise RegistryError."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or len(value) > MAX_NAME_LENGTH \
            or value in (".", ".."):
        raise RegistryError(f"invalid {what} {value!r}: use lowercase letters, digits, '.', '_', '-', "
                            f"starting with a letter or digit (pattern [a-z0-9][a-z0-9._-]*)")
    return value


@dataclass(frozen=True)
class Reference:
    """A parsed `NAME@ALIAS`, `NAME:VERSION`, `NAME@sha256:HEX` or `NAME` (alias `latest`)."""

    name: str
    version: str | None = None
    alias: str | None = None
    digest: str | None = None  # lowercase hex (a prefix of >= MIN_DIGEST_PREFIX digits)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.digest is not None:
            return f"{self.name}@{DIGEST_PREFIX}{self.digest}"
        return f"{self.name}@{self.alias or LATEST}"


def parse_reference(text: str) -> Reference:
    """Parse a reference; every part is validated like a name."""
    if "@" in text and text.split("@", 1)[1].startswith(DIGEST_PREFIX):
        name, digest = text.split("@", 1)
        hexdigits = digest[len(DIGEST_PREFIX):]
        if not _HEX.fullmatch(hexdigits) or not MIN_DIGEST_PREFIX <= len(hexdigits) <= 64:
            raise RegistryError(f"invalid reference {text!r}: a digest reference is NAME@sha256:HEX with "
                                f"{MIN_DIGEST_PREFIX} to 64 lowercase hex digits")
        return Reference(validate_name(name), digest=hexdigits)
    if "@" in text and ":" in text:
        raise RegistryError(f"invalid reference {text!r}: use NAME@ALIAS or NAME:VERSION, not both")
    if "@" in text:
        name, alias = text.split("@", 1)
        return Reference(validate_name(name), alias=validate_name(alias, "alias"))
    if ":" in text:
        name, version = text.split(":", 1)
        return Reference(validate_name(name), version=validate_version(version))
    return Reference(validate_name(text), alias=LATEST)


def validate_version(value: str) -> str:
    """Version ids are positive integers without leading zeros."""
    validate_name(value, "version")
    if not value.isdigit() or value.startswith("0"):
        raise RegistryError(f"invalid version {value!r}: versions are positive integers (1, 2, ...)")
    return value


def version_dir(name: str, version: str) -> str:
    """The folder of `name:version` under the registry root."""
    return f"{name}/versions/{version}"


def timestamp() -> str:
    """Now, as the registry records it (created_at, updated_at): UTC ISO 8601, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# --- manifest ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """sha256 and size of one file; files larger than one part also list the sha256 of every
    `part_size`-byte part, so that `pull` verifies parts in parallel as they arrive instead
    of hashing the whole file in one serial pass (each byte is still covered by a sha256
    written in the manifest, and the whole-file sha256 was computed from the same bytes)."""

    sha256: str
    size: int
    part_size: int | None = None
    parts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "size": self.size}
        if self.parts:
            out.update(part_size=self.part_size, parts=list(self.parts))
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FileEntry:
        parts = tuple(str(p) for p in raw.get("parts") or ())
        part_size = int(raw["part_size"]) if parts else None
        size = int(raw["size"])
        if parts and (part_size is None or part_size <= 0 or len(parts) != -(-size // part_size)):
            raise ValueError(f"{len(parts)} part hashes do not cover {size} bytes in parts of {part_size}")
        return cls(str(raw["sha256"]), size, part_size, parts)


@dataclass(frozen=True)
class Manifest:
    """What a version contains and where it came from (contract 5)."""

    name: str
    version: str
    files: dict[str, FileEntry]
    base: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    lineage: dict[str, Any] | None = None
    created_at: str = ""
    raw: bytes = field(default=b"", repr=False, compare=False)  # the stored bytes, when read
    stored_digest: str = field(default="", repr=False, compare=False)  # its `digest` field, when read

    def content(self) -> dict[str, Any]:
        """What the digest covers: format, files, base, metrics, gate, lineage (not name/version/time)."""
        return {"format": MANIFEST_FORMAT, "files": {k: v.to_dict() for k, v in sorted(self.files.items())},
                "base": self.base, "metrics": self.metrics, "gate": self.gate, "lineage": self.lineage}

    @property
    def digest(self) -> str:
        """`sha256:<hex>` of the canonical content JSON: the version's content address."""
        return DIGEST_PREFIX + content_digest(self.content())

    @property
    def gate_status(self) -> str:
        """`passed`, `failed` or `missing` (published without an evaluation)."""
        if not isinstance(self.gate, dict):
            return "missing"
        return "passed" if self.gate.get("passed") is True else "failed"

    def to_json(self) -> str:
        body = {"format": MANIFEST_FORMAT, "name": self.name, "version": int(self.version),
                "created_at": self.created_at, "digest": self.digest, **self.content()}
        return json.dumps(body, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != MANIFEST_FORMAT:
                raise RegistryError(f"{source}: manifest format {raw.get('format')!r}, this lcmlora reads format "
                                    f"{MANIFEST_FORMAT}; republish the folder with this version")
            files = {check_rel(k): FileEntry.from_dict(v) for k, v in raw["files"].items()}
            return cls(name=raw["name"], version=str(int(raw["version"])), files=files, base=raw.get("base"),
                       metrics=raw.get("metrics"), gate=raw.get("gate"), lineage=raw.get("lineage"),
                       created_at=raw.get("created_at", ""),
                       raw=text.encode() if isinstance(text, str) else bytes(text),
                       stored_digest=str(raw.get("digest", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RegistryError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from None

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())


def content_digest(content: dict[str, Any]) -> str:
    """Hex sha256 of `content` as canonical JSON (sorted keys, no whitespace, ASCII)."""
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def hash_file(path: Path, part_size: int = PART_SIZE) -> FileEntry:
    """One pass over `path`: whole-file sha256, size, and per-part sha256s if over one part."""
    whole, parts, size = hashlib.sha256(), [], 0
    with open(path, "rb") as fh:
        while chunk := fh.read(part_size):
            whole.update(chunk)
            parts.append(hashlib.sha256(chunk).hexdigest())
            size += len(chunk)
    if len(parts) <= 1:
        return FileEntry(whole.hexdigest(), size)
    return FileEntry(whole.hexdigest(), size, part_size, tuple(parts))
