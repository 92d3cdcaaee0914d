"""Alias events: every alias move, as an append-only log under the registry root and a Prefect event.

Log layout (docs/registry.md, "Alias events"): one JSON object per move,

    ROOT/NAME/events/ALIAS/SEQUENCE.json     create-only, SEQUENCE zero-padded to 10 digits

where SEQUENCE is the move's 1-based position in the alias's history (the compare-and-swap
on the alias file makes it unique), so lexical order is move order and a consumer tails one
alias with `list_objects_v2(Prefix="PREFIX/NAME/events/ALIAS/", StartAfter=<last key>)`.
Objects are never rewritten or deleted by lcmlora. The alias file's `history` stays the source
of truth: an event whose writer died after the move but before the write is rewritten by the
next move of that alias (`backfill`).

The Prefect event `lcmlora.alias.moved` (resource `lcmlora.model.NAME`) carries the same
payload and is sent only when a Prefect API is configured (`PREFECT_API_URL`); Prefect is
imported only then, so the registry works without a server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

from components.storage.storage import AlreadyExists, Storage

EVENT = "lcmlora.alias.moved"
SEQUENCE_DIGITS = 10
DELIVERY_TIMEOUT_S = 30.0  # how long an alias move waits for the Prefect API to confirm its event

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AliasEvent:
    """One alias move: `alias` of `name` went from `from_version` to `to_version` (JSON ints)."""

    name: str
    alias: str
    sequence: int  # 1-based position in the alias history
    from_version: int | None
    to_version: int
    digest: str  # `sha256:<hex>` of the version moved to
    kind: str  # publish | set | force | rollback
    reason: str | None
    moved_at: str  # ISO 8601 UTC, the history entry's `updated_at`

    def payload(self) -> dict[str, Any]:
        """The Prefect event payload and the log object's body."""
        body = asdict(self)
        body["from"] = body.pop("from_version")
        body["to"] = body.pop("to_version")
        return body

    @classmethod
    def from_payload(cls, body: dict[str, Any]) -> AliasEvent:
        return cls(name=body["name"], alias=body["alias"], sequence=int(body["sequence"]),
                   from_version=None if body.get("from") is None else int(body["from"]),
                   to_version=int(body["to"]), digest=body["digest"], kind=body["kind"],
                   reason=body.get("reason"), moved_at=body["moved_at"])


def event_key(name: str, alias: str, sequence: int) -> str:
    """`NAME/events/ALIAS/0000000007.json`, relative to the registry root."""
    return f"{name}/events/{alias}/{sequence:0{SEQUENCE_DIGITS}d}.json"


def write_event(storage: Storage, event: AliasEvent) -> bool:
    """Append `event` (create-only); False when that sequence number was already written."""
    body = json.dumps({"event": EVENT, **event.payload()}, sort_keys=True).encode()
    try:
        storage.write_bytes(event_key(event.name, event.alias, event.sequence), body, create_only=True)
    except AlreadyExists:
        return False
    return True


def read_events(storage: Storage, name: str, alias: str, after: int = 0) -> list[AliasEvent]:
    """The logged moves of `alias` with sequence > `after`, in order."""
    out = []
    for entry in storage.ls(f"{name}/events/{alias}"):
        stem = entry.removesuffix(".json")
        if entry.endswith(".json") and stem.isdigit() and int(stem) > after:
            body = json.loads(storage.read_bytes(f"{name}/events/{alias}/{entry}"))
            out.append(AliasEvent.from_payload(body))
    return sorted(out, key=lambda e: e.sequence)


def prefect_api_configured() -> bool:
    """True when a Prefect API URL is set (environment or active profile)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    profiles = os.environ.get("PREFECT_PROFILES_PATH") or os.path.expanduser("~/.prefect/profiles.toml")
    if "prefect.settings" not in sys.modules and not os.path.exists(profiles):
        return False  # Prefect not in use: do not import it
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def emit_prefect(event: AliasEvent) -> bool:
    """Send `lcmlora.alias.moved` to the configured Prefect API; True once the server confirmed it.

    The event goes through its own events client (not Prefect's background worker, whose queue
    a short-lived CLI process could exit before flushing: a real server then missed moves) with a
    checkpoint after every event, so a True means the server's websocket has taken it. Delivery
    failures are logged and return False: the log above is the record, an alias move never fails
    for them.
    """
    if not prefect_api_configured():
        return False
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    prefect_event = Event(event=EVENT, resource={"prefect.resource.id": f"lcmlora.model.{event.name}",
                                                 "prefect.resource.name": event.name},
                          payload=event.payload())

    async def send() -> None:
        async with get_events_client(reconnection_attempts=2, checkpoint_every=1) as client:
            await client.emit(prefect_event)

    try:
        run_coro_as_sync(asyncio.wait_for(send(), DELIVERY_TIMEOUT_S))
    except Exception as exc:  # noqa: BLE001 - any delivery failure: logged, the move stands
        logger.warning("%s@%s: Prefect event %s not delivered (%s: %s); the event log has it",
                       event.name, event.alias, EVENT, type(exc).__name__, exc)
        return False
    return True
