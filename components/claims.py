"""Create-only claims in storage: which process works on what, and when its owner is gone.

One mechanism for every place two runs may race for the same work: the encode and curate
stages claim their keyed output folder (another base with the same VAE, or the same source,
may be on it right now), the registry claims version ids. A claim is a small JSON object
written create-only; it is dead when it is older than the caller's staleness bound (its owner
refreshes it while working) or when its owner is a process of this host that no longer runs.

    record = claim_record("flow-run-123")         # {owner, claimed_at, host, pid}
    if claim_work(storage, "stages/curate/K/curate.claim.json", "stages/curate/K/manifest.parquet",
                  "flow-run-123", stale_s=600): ...   # ours: do the work; else the other finished it
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from components.storage.storage import AlreadyExists, Storage


def default_owner() -> str:
    """host:pid, when the caller has no better identity (a flow run id survives a retry)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_record(owner: str | None = None, **extra: Any) -> dict[str, Any]:
    """A claim's content: who (owner, host, pid), since when (claimed_at), and the caller's fields."""
    return {"owner": owner or default_owner(), "claimed_at": time.time(), "host": socket.gethostname(),
            "pid": os.getpid(), **extra}


def claim_dead(claim: dict[str, Any] | None, stale_s: float) -> bool:
    """Missing, not refreshed for `stale_s` seconds, or made by a process of this host that no longer runs."""
    if claim is None:
        return True
    claimed_at = claim.get("claimed_at", claim.get("at", 0))  # "at": encode claims written before this module
    if time.time() - float(claimed_at) > stale_s:
        return True
    if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int):
        try:
            os.kill(claim["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def claim_work(storage: Storage, claim_rel: str, done_rel: str, owner: str, *, stale_s: float, poll_s: float = 1.0,
               on_wait: Callable[[str], None] | None = None) -> bool:
    """Claim the work whose result is `done_rel`: True when this owner does it, False once another finished it.

    Waits while a live claim of another owner stands; takes over a dead one (what its owner
    wrote is kept: the work resumes from it). `on_wait(holder)` is called once when it starts waiting.
    """
    waited = False
    while True:
        if storage.exists(done_rel):
            return False
        try:
            storage.write_text(claim_rel, json.dumps(claim_record(owner)), create_only=True)
            return True
        except AlreadyExists:
            pass
        try:
            holder = json.loads(storage.read_text(claim_rel))
        except (FileNotFoundError, ValueError):
            continue  # released (or being written) just now: look again
        if holder.get("owner") == owner:
            return True  # our own earlier attempt (a retried run): resume its work
        if claim_dead(holder, stale_s):
            storage.delete(claim_rel)
            continue
        if on_wait is not None and not waited:
            on_wait(str(holder.get("owner")))
        waited = True
        time.sleep(poll_s)


def refresh_claim(storage: Storage, claim_rel: str, owner: str) -> None:
    """The claim's heartbeat: rewrite it with the time now (the owner only)."""
    storage.write_text(claim_rel, json.dumps(claim_record(owner)))
