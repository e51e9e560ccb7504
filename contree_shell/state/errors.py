"""Errors raised by the local state stores."""

from __future__ import annotations

__all__ = ["NoSession", "StateError"]


class StateError(Exception):
    """A user-facing problem with local state; ``message`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoSession(StateError):
    """The session has no history yet (nothing was `use`d)."""

    def __init__(self, key: str) -> None:
        super().__init__("No active session. Run `contree use IMAGE` to start one.")
        self.key = key
