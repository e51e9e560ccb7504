"""Server-Sent Events framing (pure): lines in, frames out."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["SseFrame", "SseParser", "event_from_frame", "parse_frames"]


@dataclass
class SseFrame:
    """One dispatched SSE frame; `data` lines are joined with newlines."""

    event: str
    data: str
    id: str | None = None


class SseParser:
    """Incremental SSE parser: feed it one line at a time (without the line ending).

    Comment lines (`: keepalive`) are ignored; a blank line dispatches the frame.
    """

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._seen_field = False

    def feed(self, line: str) -> SseFrame | None:
        """Consume one line; return a frame when the line completes one."""
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        else:
            return None  # `retry` and unknown fields carry nothing we use
        self._seen_field = True
        return None

    def finish(self) -> SseFrame | None:
        """End of stream. An unterminated trailing frame is discarded, as the spec says."""
        self._reset()
        return None

    def _dispatch(self) -> SseFrame | None:
        if not self._seen_field:
            return None
        frame = SseFrame(event=self._event or "message", data="\n".join(self._data), id=self._id)
        self._reset()
        return frame

    def _reset(self) -> None:
        self._event = ""
        self._data = []
        self._id = None
        self._seen_field = False


def parse_frames(lines: Iterable[str]) -> Iterator[SseFrame]:
    """Every complete frame in `lines` (a convenience over SseParser)."""
    parser = SseParser()
    for line in lines:
        frame = parser.feed(line.rstrip("\r\n"))
        if frame is not None:
            yield frame
    parser.finish()


def event_from_frame(frame: SseFrame) -> dict[str, Any] | None:
    """The `OperationEvent` dict carried by a normal frame, or None if it carries none.

    `type` falls back to the frame's `event:` and `id` to its `id:` so a slightly
    different server still yields usable events.
    """
    try:
        event = json.loads(frame.data)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    event.setdefault("type", frame.event)
    if "id" not in event and frame.id is not None:
        try:
            event["id"] = int(frame.id)
        except ValueError:
            return None
    if not isinstance(event.get("id"), int):
        return None
    if not isinstance(event.get("data"), dict):
        event["data"] = {}
    return event
