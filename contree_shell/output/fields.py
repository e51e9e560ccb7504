"""Field conversions shared by every formatter (pure).

- ``created_at``, ``updated_at``, ``ts``: parsed as UTC, shown in local time
  (``HH:MM:SS`` for today in tables, the full date otherwise); ``mtime`` (epoch
  seconds) likewise.
- ``duration`` (seconds): ``12s``, ``3m4s``, ``1h2m``.
- ``mode``: octal (``0644``).
- None: ``""``; booleans: ``true``/``false``; nested values: compact JSON.

The JSON formats keep values machine-readable: only ``mode`` becomes an octal
string there; timestamps and durations stay as the API sent them.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "TIME_FIELDS",
    "Style",
    "cell_text",
    "convert",
    "format_duration",
    "format_local_time",
    "format_mode",
    "parse_timestamp",
]

TIME_FIELDS = frozenset({"created_at", "updated_at", "ts", "mtime"})

# display: tables (compact times); text: csv/tsv/plain (full local date-times);
# json: json/json-pretty.
Style = Literal["display", "text", "json"]


def parse_timestamp(value: Any) -> datetime | None:
    """Parse an API timestamp (ISO 8601 with ``Z``, an offset, fractional seconds or
    none; or epoch seconds) into an aware datetime. Naive values are UTC."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return None
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # fromisoformat in 3.11 takes up to 6 fractional digits; servers may send 9.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = ""
        i = 0
        while i < len(rest) and rest[i].isdigit():
            digits += rest[i]
            i += 1
        text = f"{head}.{(digits + '000000')[:6]}{rest[i:]}" if digits else head + rest[i:]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_local_time(value: Any, *, compact: bool = True, now: datetime | None = None) -> str:
    """Local time: ``HH:MM:SS`` when ``compact`` and the date is today, else
    ``YYYY-MM-DD HH:MM:SS``. Unparseable values are returned as text."""
    parsed = parse_timestamp(value)
    if parsed is None:
        return "" if value is None else str(value)
    local = parsed.astimezone()
    if compact:
        today = (now or datetime.now(UTC)).astimezone().date()
        if local.date() == today:
            return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d %H:%M:%S")


def format_duration(value: Any) -> str:
    """Seconds as ``0.4s``, ``12s``, ``3m4s`` or ``1h2m``."""
    if value is None or isinstance(value, bool):
        return ""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(seconds):
        return str(value)
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 10 and seconds != int(seconds):
        return f"{sign}{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{sign}{whole}s"
    if whole < 3600:
        return f"{sign}{whole // 60}m{whole % 60}s"
    return f"{sign}{whole // 3600}h{whole % 3600 // 60}m"


def format_mode(value: Any) -> str:
    """Permission bits in octal (``0644``); file-type bits are dropped."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int):
        return f"{value & 0o7777:04o}"
    return str(value)


def cell_text(value: Any) -> str:
    """A scalar as text: None → "", booleans lower-case, nested → compact JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return format_local_time(value, compact=False)
    return str(value)


def convert(key: str, value: Any, style: Style, *, now: datetime | None = None) -> Any:
    """Convert one field for ``style``: a string for display/text, a JSON value for json."""
    if style == "json":
        if key == "mode" and isinstance(value, int) and not isinstance(value, bool):
            return format_mode(value)
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return value
    if value is None:
        return ""
    if key in TIME_FIELDS and not isinstance(value, bool):
        return format_local_time(value, compact=style == "display", now=now)
    if key == "duration":
        return format_duration(value)
    if key == "mode":
        return format_mode(value)
    return cell_text(value)
