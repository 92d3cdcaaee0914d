"""The `lcmlora.base.registered` event: what starts the new-base deployment (infra/prefect.yaml)."""

from __future__ import annotations

import asyncio
import re

BASE_REGISTERED = "lcmlora.base.registered"


def base_resource_id(reference: str, name: str | None = None) -> str:
    """`lcmlora.base.NAME`: the event's resource (the trigger matches `lcmlora.base.*`)."""
    slug = name or re.sub(r"[^a-z0-9._-]+", "-", reference.rstrip("/").rsplit("/", 1)[-1].lower()).strip("-.")
    return f"lcmlora.base.{slug or 'base'}"


def emit_base_registered(reference: str, name: str | None = None) -> str:
    """Send the event to the configured Prefect API and wait until it is delivered; returns its id."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    event = Event(event=BASE_REGISTERED, resource={"prefect.resource.id": base_resource_id(reference, name)},
                  payload={"reference": reference, "name": name or ""})

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(event)

    asyncio.run(send())
    return str(event.id)
