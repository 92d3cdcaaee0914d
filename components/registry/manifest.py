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
A stored manifest is read through `StoredManifest` (pydantic, strict types, no unknown keys: every
bad field is named at once) and written with `json.dumps`, so its bytes never change.
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
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    NonNegativeInt,
    PositiveInt,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from components.storage.storage import PART_SIZE, StorageError, check_rel

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


Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


def _relative_path(rel: str) -> str:
    """A `files` key: a normalised relative path (pydantic reports the ValueError with its key)."""
    try:
        return check_rel(rel)
    except StorageError as exc:
        raise ValueError(str(exc)) from None


@pydantic_dataclass(frozen=True, config=ConfigDict(strict=True, extra="forbid"))
class FileEntry:
    """sha256 and size of one file; files larger than one part also list the sha256 of every
    `part_size`-byte part, so that `pull` verifies parts in parallel as they arrive instead
    of hashing the whole file in one serial pass (each byte is still covered by a sha256
    written in the manifest, and the whole-file sha256 was computed from the same bytes)."""

    sha256: Sha256Hex
    size: NonNegativeInt
    part_size: PositiveInt | None = None  # only with `parts`
    parts: tuple[Sha256Hex, ...] = ()

    @model_validator(mode="after")
    def _parts_cover_size(self) -> FileEntry:
        if not self.parts and self.part_size is not None:
            raise ValueError(f"part_size {self.part_size} without parts: list the parts' sha256s or drop part_size")
        if self.parts and (self.part_size is None or len(self.parts) != -(-self.size // self.part_size)):
            raise ValueError(f"{len(self.parts)} part hashes do not cover {self.size} bytes in parts of "
                             f"{self.part_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "size": self.size}
        if self.parts:
            out.update(part_size=self.part_size, parts=list(self.parts))
        return out


class StoredManifest(BaseModel):
    """The manifest file exactly as `Manifest.to_json` writes it, checked field by field on read:
    strict JSON types (a size written as a string is refused, not converted), no unknown keys."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    format: Literal[2]  # MANIFEST_FORMAT; checked first, with its own message
    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN.pattern, max_length=MAX_NAME_LENGTH)]
    version: PositiveInt  # a JSON integer on disk, a string in Python
    created_at: str
    digest: Annotated[str, StringConstraints(pattern=rf"^{DIGEST_PREFIX}[0-9a-f]{{64}}$")]
    files: dict[Annotated[str, AfterValidator(_relative_path)], FileEntry]
    base: dict[str, Any] | None
    metrics: dict[str, Any] | None
    gate: dict[str, Any] | None
    lineage: dict[str, Any] | None


@dataclass(frozen=True)
class Manifest:
    """What a version contains and where it came from (contract 5); `StoredManifest` is its file."""

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
        # json.dumps, not pydantic: the stored bytes (ASCII escapes, NaN, float reprs) must not change.
        body = {"format": MANIFEST_FORMAT, "name": self.name, "version": int(self.version),
                "created_at": self.created_at, "digest": self.digest, **self.content()}
        return json.dumps(body, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Manifest:
        """Parse and validate a stored manifest; RegistryError names `source` and every bad field."""
        try:
            stored = StoredManifest.model_validate_json(text)
        except ValidationError as exc:
            raise manifest_error(exc, source) from None
        return cls(name=stored.name, version=str(stored.version), files=stored.files, base=stored.base,
                   metrics=stored.metrics, gate=stored.gate, lineage=stored.lineage, created_at=stored.created_at,
                   raw=text.encode() if isinstance(text, str) else bytes(text), stored_digest=stored.digest)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())


def manifest_error(exc: ValidationError, source: str) -> RegistryError:
    """One RegistryError for a manifest that failed validation: the format message if the format
    is not ours (an older lcmlora wrote it), else every bad field by its path at once."""
    errors = exc.errors(include_url=False)
    for err in errors:
        if err["loc"] == ("format",):
            found = None if err["type"] == "missing" else err["input"]
            return RegistryError(f"{source}: manifest format {found!r}, this lcmlora reads format "
                                 f"{MANIFEST_FORMAT}; republish the folder with this version")
    problems = []
    for err in errors:
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        if isinstance(err["input"], str | int | float) and err["type"] != "json_invalid":
            msg += f" (got {err['input']!r:.60})"
        problems.append(f"{field_path(err['loc'])}: {msg}" if err["loc"] else msg)
    return RegistryError(f"{source}: malformed manifest: " + "; ".join(problems))


def field_path(loc: tuple[str | int, ...]) -> str:
    """`files['a.safetensors'].size` for pydantic's ('files', 'a.safetensors', 'size')."""
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for a bad dict key: the key itself is at fault
            out += " (the key)"
        elif isinstance(part, str) and part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


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
