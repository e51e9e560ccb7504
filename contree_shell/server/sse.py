"""Server-Sent Events for operation logs: framing and the follow loop."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from contree_shell.sandbox.operations import TERMINAL, Event, OperationsDB

KEEPALIVE_SECONDS = 15.0
KEEPALIVE = b": keepalive\n\n"
_BATCH = 500


def frame(event: Event) -> bytes:
    """One SSE frame: `id:`, `event:` (= data.type), `data:` one-line JSON, blank line."""
    data = json.dumps(event.as_dict(), separators=(",", ":"), ensure_ascii=True)
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()


async def event_stream(
    ops: OperationsDB,
    op_uuid: str,
    *,
    after: int | None,
    spid: int | None,
    follow: bool,
    keepalive: float = KEEPALIVE_SECONDS,
) -> AsyncIterator[bytes]:
    """Yield frames of `op_uuid` with id > after; with `follow`, until `completion`.

    Waiting is event-driven: the subscription is cleared before each read, so an event
    appended between the read and the wait wakes us at once; idle periods send a
    keepalive comment every `keepalive` seconds.
    """
    cursor = after
    with ops.subscribe(op_uuid) as sub:
        while True:
            sub.clear()
            # Read the status before the events: if it is terminal now, the completion
            # event is already in the log and this read will see it.
            terminal = ops.get(op_uuid).status in TERMINAL
            while True:
                batch = ops.events(op_uuid, after=cursor, limit=_BATCH)
                for ev in batch:
                    cursor = ev.id
                    if spid is None or ev.spid == spid:
                        yield frame(ev)
                    if ev.type == "completion":
                        return
                if len(batch) < _BATCH:
                    break
            if not follow or terminal:
                return
            while not await sub.wait(keepalive):
                yield KEEPALIVE
