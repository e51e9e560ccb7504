"""Errors raised by the API client. Every one carries a one-line ``message`` for the user."""

from __future__ import annotations

import json
from typing import Any

from contree_shell.config import ConfigError

__all__ = [
    "USER_ERRORS",
    "ApiError",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "ConnectionFailed",
    "ContreeError",
    "Forbidden",
    "Gone",
    "NotFound",
    "RateLimited",
    "ServerError",
    "ServerStartError",
    "StreamError",
    "TooEarly",
    "Unauthorized",
    "Unprocessable",
    "api_error",
    "one_line",
]


def one_line(text: object) -> str:
    """Collapse any text (multi-line server errors, exception reprs) into one line."""
    return " ".join(str(text).split())


class ContreeError(Exception):
    """Base of every client error; ``message`` is one line, ready for `[ERROR] …`."""

    def __init__(self, message: str) -> None:
        self.message = one_line(message) or type(self).__name__
        super().__init__(self.message)


class ApiError(ContreeError):
    """The server answered with HTTP status >= 400: message is `HTTP <status>: <error>`."""

    def __init__(
        self,
        status: int,
        error: str,
        *,
        retry_after: float | None = None,
        traceback: list[str] | None = None,
    ) -> None:
        self.status = status
        self.error = one_line(error)
        self.retry_after = retry_after
        self.traceback = traceback or []
        super().__init__(f"HTTP {status}: {self.error}" if self.error else f"HTTP {status}")


class BadRequest(ApiError):
    """400."""


class Unauthorized(ApiError):
    """401: missing or invalid token."""


class Forbidden(ApiError):
    """403: the token lacks a permission."""


class NotFound(ApiError):
    """404."""


class Conflict(ApiError):
    """409, e.g. cancelling an operation that already ended."""


class Gone(ApiError):
    """410, e.g. writing stdin to an instance that finished."""


class Unprocessable(ApiError):
    """422, e.g. downloading a directory."""


class TooEarly(ApiError):
    """425: not ready yet."""


class RateLimited(ApiError):
    """429."""


class ServerError(ApiError):
    """5xx."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    422: Unprocessable,
    425: TooEarly,
    429: RateLimited,
}


def _error_text(error: Any) -> str:
    if isinstance(error, str):
        return error
    if isinstance(error, list):
        # Validation errors: [{"loc": [...], "msg": "..."}, ...]
        parts = []
        for item in error:
            if isinstance(item, dict) and "msg" in item:
                loc = item.get("loc")
                where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
                parts.append(f"{where}: {item['msg']}" if where else str(item["msg"]))
            else:
                parts.append(_error_text(item))
        return "; ".join(parts)
    return json.dumps(error, separators=(",", ":"), sort_keys=True)


def api_error(
    status: int, body: bytes | str, *, retry_after: float | None = None
) -> ApiError:
    """Build the typed error for an HTTP error response body (JSON `Error` or raw text)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    error: str = text.strip()
    traceback: list[str] = []
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "error" in parsed:
        error = _error_text(parsed["error"])
        tb = parsed.get("traceback")
        if isinstance(tb, list):
            traceback = [str(line) for line in tb]
    if len(error) > 500:
        error = error[:500] + "…"
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return cls(status, error, retry_after=retry_after, traceback=traceback)


class ConnectionFailed(ContreeError):
    """The server could not be reached (refused, no socket, DNS, timeout, dropped)."""


class StreamError(ContreeError):
    """An event stream could not be read to its end (e.g. the log ended without completion)."""


class ServerStartError(ContreeError):
    """The local server could not be started; message holds the reason it printed."""


# What a command handler catches to print `[ERROR] <message>` and exit non-zero.
USER_ERRORS: tuple[type[Exception], ...] = (ContreeError, ConfigError)
