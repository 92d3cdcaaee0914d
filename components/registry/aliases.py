"""Aliases: compare-and-swap moves with their history, gated promotion and rollback.

    NAME/aliases/ALIAS.json   {name, alias, version, updated_at, history}, moved by CAS
    NAME/events/ALIAS/SEQ.json  one per move (`components/registry/events.py`)

Every move re-reads the alias, appends to its history and writes it back only if nobody
moved it meanwhile (retried with back-off), then logs the event. An alias other than
`latest` is refused for a version whose gate did not pass unless a reason is given.
`Registry.alias_set`, `alias_rollback` and `alias_history` in `components/registry/registry.py` call
these.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from components.registry.events import AliasEvent, emit_prefect, write_event
from components.registry.manifest import Manifest, RegistryError, timestamp
from components.storage.storage import NotFound, PreconditionFailed, Storage

CAS_ATTEMPTS = 200  # alias moves retried this often under contention before giving up


class GateRefused(RegistryError):
    """An alias move (or a publish with an alias) refused: the version's gate did not pass."""


class NothingToRollBack(Exception):
    """The alias history has no earlier version to go back to."""


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


def alias_path(name: str, alias: str) -> str:
    return f"{name}/aliases/{alias}.json"


def check_gate(manifest: Manifest, what: str, force_reason: str | None) -> None:
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


def read_alias(storage: Storage, name: str, alias: str) -> tuple[dict[str, Any], str]:
    """(state, etag) of the alias file; NotFound if the alias was never set."""
    path = alias_path(name, alias)
    data, tag = storage.read_with_etag(path)
    try:
        state = json.loads(data)
        state["version"] = str(state["version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"{storage.url(path)}: malformed alias file ({exc})") from None
    return state, tag


def move_alias(storage: Storage, name: str, alias: str, version: str | Callable[[list[AliasMove]], str],
               digest_of: Callable[[str], str], *, forward_only: bool = False, kind: str = "set",
               reason: str | None = None) -> AliasMove | None:
    """Compare-and-swap `alias` to `version` (or to `version(history)`), then log the event.

    `digest_of(version)` is the verified digest of a version (it must exist)."""
    path = alias_path(name, alias)
    for attempt in range(CAS_ATTEMPTS):
        try:
            state, tag = read_alias(storage, name, alias)
        except NotFound:
            state, tag = {"name": name, "alias": alias, "version": None, "history": []}, None
        previous = state.get("version")
        history = [AliasMove.from_dict(h) for h in state.get("history", [])]
        target = version(history) if callable(version) else version
        if forward_only and previous is not None and int(previous) >= int(target):
            return None
        digest = digest_of(target)
        move = AliasMove(version=target, previous=previous, updated_at=timestamp(), kind=kind, reason=reason,
                         digest=digest)
        history.append(move)
        new = {"name": name, "alias": alias, "version": int(target), "updated_at": move.updated_at,
               "history": [h.to_dict() for h in history]}
        try:
            storage.write_if_match(path, json.dumps(new, indent=1).encode(), tag)
        except PreconditionFailed:
            time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 20)))  # back off, then re-read
            continue
        log_moves(storage, name, alias, history)
        return move
    raise RegistryError(f"{name}@{alias}: could not move the alias after {CAS_ATTEMPTS} attempts "
                        "(too many concurrent writers)")


def log_moves(storage: Storage, name: str, alias: str, history: list[AliasMove]) -> None:
    """Append the last move to the event log (and the one before, if its writer died before
    logging it); send the Prefect event for the last move."""
    events = [AliasEvent(name=name, alias=alias, sequence=i + 1, to_version=int(m.version),
                         from_version=None if m.previous is None else int(m.previous),
                         digest=m.digest or "", kind=m.kind, reason=m.reason, moved_at=m.updated_at)
              for i, m in enumerate(history)][-2:]
    for event in events:
        write_event(storage, event)
    emit_prefect(events[-1])


def rollback_target(history: list[AliasMove]) -> str:
    """The version before the current one, undoing earlier rollbacks (a stack of moves)."""
    stack: list[str] = []
    for move in history:
        if move.kind == "rollback" and stack:
            stack.pop()
        else:
            stack.append(move.version)
    if len(stack) < 2:
        raise NothingToRollBack

    return stack[-2]
