"""Query-parameter parsing shared by the routes (flags, pagination, time filters)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from starlette.datastructures import QueryParams

from contree_shell.sandbox.instances import is_uuid
from contree_shell.server.errors import ApiError

_INTERVAL_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SHA_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def flag(params: QueryParams, name: str) -> bool:
    """A flag: present without value or any value but `0`/`false` is on."""
    if name not in params:
        return False
    return params[name].strip().lower() not in ("0", "false", "no", "off")


_INT64_MAX = 2**63 - 1


def int_param(
    params: QueryParams,
    name: str,
    default: int | None,
    *,
    minimum: int = 0,
    maximum: int | None = None,
) -> int | None:
    """An integer query parameter in range, or 400."""
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"'{name}' must be an integer, got {raw!r}") from None
    if maximum is None:
        maximum = _INT64_MAX  # beyond it SQLite cannot even compare
    if value < minimum or value > maximum:
        bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ApiError(400, f"'{name}' must be in {bound}, got {value}")
    return value


def page(params: QueryParams) -> tuple[int, int]:
    """(limit, offset) with the API's bounds (limit 1..1000, default 100)."""
    limit = int_param(params, "limit", 100, minimum=1, maximum=1000)
    offset = int_param(params, "offset", 0, minimum=0)
    assert limit is not None and offset is not None
    return limit, offset


def parse_time(value: str, *, now: datetime | None = None) -> datetime:
    """A Unix timestamp, an interval ago (`600s`, `2h`, `1w`) or an ISO datetime.

    Naive ISO datetimes are server-local time (the SDK sends local `isoformat()`).
    """
    text = value.strip()
    now = now or datetime.now(UTC)
    m = _INTERVAL_RE.match(text)
    if m:
        try:
            return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
        except OverflowError:
            raise ValueError(value) from None
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except (ValueError, OverflowError):
        pass
    try:
        # "+00:00" arrives as " 00:00" when a client did not percent-encode the "+"
        fixed = re.sub(r"(T\d\d:\d\d(?::\d\d(?:\.\d+)?)?) (\d\d:?\d\d)$", r"\1+\2", text)
        fixed = re.sub(r"(\.\d{6})\d+", r"\1", fixed)
        dt = datetime.fromisoformat(fixed)
    except ValueError:
        raise ValueError(value) from None
    try:
        if dt.tzinfo is None:
            dt = dt.astimezone()  # naive: the server's local time
        return dt.astimezone(UTC)
    except (OverflowError, OSError, ValueError):  # e.g. year 1 or 9999 near the edge
        raise ValueError(value) from None


def time_param(params: QueryParams, name: str) -> datetime | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return parse_time(raw)
    except ValueError:
        raise ApiError(
            400,
            f"'{name}' must be a Unix timestamp, an interval like 15m, "
            f"or an ISO datetime, got {raw!r}",
        ) from None


def require_uuid(value: str, what: str = "uuid") -> str:
    if not is_uuid(value):
        raise ApiError(400, f"invalid {what}: {value!r}")
    return value.lower()


def require_sha256(value: str) -> str:
    if not _SHA_RE.match(value):
        raise ApiError(400, f"invalid sha256: {value!r} (64 hex characters)")
    return value.lower()
