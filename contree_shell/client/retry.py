"""Bounded retry policy (pure): which failures to retry and how long to wait.

Unlike the official client (unbounded, replays every POST), attempts are capped and a
request that may have reached the server is replayed only if it is safe to repeat.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

__all__ = ["RETRYABLE_STATUSES", "RetryPolicy", "parse_retry_after"]

# 425/429 mean "not processed, come back later"; 5xx may or may not have been processed.
RETRYABLE_STATUSES = frozenset({425, 429})
_NOT_PROCESSED = frozenset({425, 429})


@dataclass(frozen=True)
class RetryPolicy:
    """Delays between attempts; `max_attempts` counts the first try."""

    ladder: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0)
    max_attempts: int = 6
    retry_after_cap: float = 10.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait after failed attempt number `attempt` (1-based); None = give up."""
        if attempt >= self.max_attempts:
            return None
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.retry_after_cap)
        return self.ladder[min(attempt, len(self.ladder)) - 1]

    @staticmethod
    def status_retryable(status: int, *, replayable: bool) -> bool:
        """Whether an HTTP error status is worth another attempt.

        A non-replayable request (spawn, stdin) is retried only when the server said it
        did not process it (425/429); a 5xx might have come after the side effect.
        """
        if replayable:
            return status in RETRYABLE_STATUSES or status >= 500
        return status in _NOT_PROCESSED


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
