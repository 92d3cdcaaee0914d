"""Version-id claims and the digest index: which publisher took which version id, for which content.

    NAME/claims/VERSION.json   create-only: {version, claimed_at, created_at, digest, owner, host, pid}
                               (components/claims.py: one claim mechanism with the stages)
    NAME/digests/HEX.json      create-only: {version, digest}, the version holding content HEX

A publisher takes the next id with a create-only claim (a racing one takes the next id), then
records its digest; a racing publisher of the same content finds the digest taken, gives its
claim back and waits for the other's version. Claims are never deleted by publish, so ids are
never reused. A claim whose publisher died is recognised here (`claim_dead`) and cleaned up by
`components/registry/gc.py`.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from components import claims
from components.registry.manifest import (
    DIGEST_PREFIX,
    MANIFEST,
    RegistryError,
    timestamp,
    version_dir,
)
from components.storage.storage import AlreadyExists, NotFound, Storage

CLAIM_ATTEMPTS = 1000  # version ids tried by one publisher before giving up
STALE_CLAIM_S = 3600.0  # gc removes incomplete versions whose claim is older than this
PUBLISH_WAIT_S = 300.0  # an identical publish waits this long for a racing publisher's version
POLL_S = 0.1  # how often it looks


def claim_dead(claim: dict[str, Any] | None) -> bool:
    """A claim whose publisher cannot finish (components/claims.py), staleness bound STALE_CLAIM_S."""
    return claims.claim_dead(claim, STALE_CLAIM_S)


def read_claim(storage: Storage, name: str, version: str) -> dict[str, Any] | None:
    """The claim of `name:version`, None if there is none."""
    try:
        claim = json.loads(storage.read_bytes(f"{name}/claims/{version}.json"))
    except NotFound:
        return None
    except ValueError as exc:
        raise RegistryError(f"{storage.url(f'{name}/claims/{version}.json')}: malformed claim ({exc})") \
            from None
    return claim if isinstance(claim, dict) else None


def claim_version(storage: Storage, name: str, digest: str) -> tuple[str, str]:
    """Take the next free version id with a create-only claim recording the manifest digest."""
    version = highest_claimed(storage, name) + 1
    created_at = timestamp()
    for _ in range(CLAIM_ATTEMPTS):
        claim = claims.claim_record(version=version, created_at=created_at, digest=digest)
        try:
            storage.write_bytes(f"{name}/claims/{version}.json", json.dumps(claim).encode(), create_only=True)
            return str(version), created_at
        except AlreadyExists:
            version += 1
    raise RegistryError(f"{name}: could not claim a version id after {CLAIM_ATTEMPTS} attempts")


def highest_claimed(storage: Storage, name: str) -> int:
    """The highest version id ever taken: claimed, tombstoned or holding files."""
    ids = [n.removesuffix(".json") for n in storage.ls(f"{name}/claims")]
    ids += [n.removesuffix(".json") for n in storage.ls(f"{name}/tombstones")]
    ids += storage.ls(f"{name}/versions")
    return max((int(i) for i in ids if i.isdigit()), default=0)


def digest_path(name: str, digest: str) -> str:
    return f"{name}/digests/{digest.removeprefix(DIGEST_PREFIX)}.json"


def claim_digest(storage: Storage, name: str, digest: str, version: str) -> str | None:
    """Record `version` as the holder of `digest` (create-only). If a racing publisher of the
    same content won, give our claim back (nothing was uploaded) and return its version."""
    try:
        storage.write_bytes(digest_path(name, digest),
                            json.dumps({"version": int(version), "digest": digest}).encode(),
                            create_only=True)
        return None
    except AlreadyExists:
        storage.delete(f"{name}/claims/{version}.json")
        holder = existing_version(storage, name, digest)
        if holder is None:
            raise RegistryError(f"{name}: the digest index for {digest} changed during publish; retry") from None
        return holder


def existing_version(storage: Storage, name: str, digest: str) -> str | None:
    """The version holding `digest`, complete or still being published; None if none (or stale)."""
    try:
        version = str(json.loads(storage.read_bytes(digest_path(name, digest)))["version"])
    except NotFound:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{storage.url(digest_path(name, digest))}: malformed ({exc})") from None
    if storage.exists(f"{version_dir(name, version)}/{MANIFEST}"):
        return version
    if claim_dead(read_claim(storage, name, version)):
        # Left by a dead publisher or a gc that stopped half-way: not a version, forget it.
        storage.delete(digest_path(name, digest))
        return None
    return version


def wait_for_version(storage: Storage, name: str, version: str, digest: str) -> bool:
    """True once the (racing) publisher of `version` wrote its manifest; False if it died."""
    deadline = time.monotonic() + PUBLISH_WAIT_S
    path = f"{version_dir(name, version)}/{MANIFEST}"
    while not storage.exists(path):
        if existing_version(storage, name, digest) is None:
            return False
        if time.monotonic() > deadline:
            raise RegistryError(f"{name}: identical content ({digest}) is being published as {name}:{version} "
                                f"by another publisher that has not finished after {PUBLISH_WAIT_S:.0f} s; "
                                "retry later (`registry gc` removes a dead publisher's claim)")
        time.sleep(POLL_S)
    return True


def forget_digest(storage: Storage, name: str, version: str) -> None:
    """Remove the digest index entry of `version` (so that its content can be published again)."""
    digest = (read_claim(storage, name, version) or {}).get("digest")
    if not digest:
        return
    with contextlib.suppress(NotFound, ValueError, KeyError, TypeError):
        if str(json.loads(storage.read_bytes(digest_path(name, digest)))["version"]) == version:
            storage.delete(digest_path(name, digest))
