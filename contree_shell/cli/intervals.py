"""`--since` / `--until` values: strict parsing of relative intervals, unix seconds, ISO dates.

Unlike the official `parse_interval`, an unknown unit is an error (never "1w = 1 second"),
a bare number is always unix seconds (never a year), and weeks are supported.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

__all__ = ["IntervalError", "parse_interval", "to_query"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RELATIVE = re.compile(r"(\d+)([a-zA-Z]+)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
HINT = "use an interval (600s, 15m, 2h, 3d, 1w), unix seconds or an ISO date (2024-05-01)"


class IntervalError(ValueError):
    """A `--since`/`--until` value that is not an interval, a timestamp or a date."""

    def __init__(self, text: str, why: str = "") -> None:
        self.message = f"Invalid time '{text}'{': ' + why if why else ''}; {HINT}"
        super().__init__(self.message)


def parse_interval(text: str, *, now: datetime | None = None) -> datetime:
    """The UTC instant `text` denotes.

    `15m` = 15 minutes before `now`; `1700000000` = unix seconds; `2024-05-01` or
    `2024-05-01T10:00:00+02:00` = ISO (naive values are local time).
    """
    value = text.strip()
    current = now or datetime.now(UTC)
    if not value:
        raise IntervalError(text, "empty")
    m = _RELATIVE.fullmatch(value)
    if m:
        unit = m.group(2).lower()
        if unit not in _UNITS:
            raise IntervalError(text, f"unknown unit '{m.group(2)}'")
        return current - timedelta(seconds=int(m.group(1)) * _UNITS[unit])
    if _NUMBER.fullmatch(value):
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except (OverflowError, OSError, ValueError):
            raise IntervalError(text, "timestamp out of range") from None
    if "-" not in value[1:]:  # ISO dates always have YYYY-MM-DD; "12345" is not one
        raise IntervalError(text)
    iso = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        parsed = datetime.fromisoformat(iso)
    except ValueError:
        raise IntervalError(text) from None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()  # local time, as a person typing a date means it
    return parsed.astimezone(UTC)


def to_query(text: str | None, *, now: datetime | None = None) -> str | None:
    """`--since/--until` as the ISO-8601 UTC string the API takes (None passes through)."""
    if text is None:
        return None
    return parse_interval(text, now=now).strftime("%Y-%m-%dT%H:%M:%SZ")
