"""Server-Sent Events for operation logs: framing and the follow loop."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from contree_shell.sandbox.operations import TERMINAL, Event, OperationsDB

KEEPALIVE_SECONDS = 15.0
KEEPALIVE = b": keepalive\n\n"
_BATCH = 500
_COALESCE_BYTES = 64 * 1024


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
    coalesce: bool = False,
) -> AsyncIterator[bytes]:
    """Yield frames of `op_uuid` with id > after; with `follow`, until `completion`.

    Waiting is event-driven: the subscription is cleared before each read, so an event
    appended between the read and the wait wakes us at once; idle periods send a
    keepalive comment every `keepalive` seconds. With `coalesce`, the frames of one read
    come as one chunk (the same bytes in fewer response writes: a short run's init,
    spawn, exit, shutdown and completion usually arrive together).
    """
    cursor = after
    with ops.subscribe(op_uuid) as sub:
        while True:
            sub.clear()
            # Read the status before the events: if it is terminal now, the completion
            # event is already in the log and this read will see it.
            terminal = ops.status(op_uuid) in TERMINAL
            while True:
                batch = ops.events(op_uuid, after=cursor, limit=_BATCH)
                pending: list[bytes] = []
                size = 0
                done = False
                for ev in batch:
                    cursor = ev.id
                    if spid is None or ev.spid == spid:
                        if not coalesce:
                            yield frame(ev)
                        else:
                            pending.append(frame(ev))
                            size += len(pending[-1])
                            if size >= _COALESCE_BYTES:  # big output: keep chunks bounded
                                yield b"".join(pending)
                                pending, size = [], 0
                    if ev.type == "completion":
                        done = True
                        break
                if pending:
                    yield b"".join(pending)
                if done:
                    return
                if len(batch) < _BATCH:
                    break
            if not follow or terminal:
                return
            while not await sub.wait(keepalive):
                yield KEEPALIVE
